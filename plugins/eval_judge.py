"""Work in progress: this plugin module is being written (see the open issues)."""
