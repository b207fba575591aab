"""The example's tests use the fixtures btkit ships for plugin authors (``registry``, ``doubles``,
``scripted``, ``cli``, an isolated cache per test), enabled the one way a third party enables them."""

pytest_plugins = ["btkit.testing.pytest_plugin"]
