"""First-party btkit plugins, each registered through the ``btkit`` entry-point group like any other."""
