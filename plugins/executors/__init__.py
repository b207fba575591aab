"""First-party shard executors (``--executor``): ``local`` (processes on this machine) and ``ray``."""
