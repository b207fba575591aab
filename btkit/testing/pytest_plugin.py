"""pytest fixtures for testing btkit plugins (and btkit itself), with model-free backends.

Opt in from your test suite's top-level ``conftest.py``::

    pytest_plugins = ["btkit.testing.pytest_plugin"]

It is not auto-loaded (no ``pytest11`` entry point), for the reason pytest's own ``pytester`` is
not: it sets environment variables for the whole session and its fixture names (``registry``,
``cli``) are generic, so it must never enter the test session of a project that merely has btkit
installed.

What it gives:

- for the whole session, ``BTKIT_EXTRA_PLUGINS`` names :mod:`btkit.testing.backends`, so a
  ``btkit`` process a test starts knows ``echo:``, ``scripted:FILE.json`` and ``det:FILE.json``;
- ``isolated_cache`` (autouse): every test has its own model-call cache, so no test sees another's
  completions;
- ``registry``: a fresh :class:`btkit.plugins.Registry` loaded from the entry points (your
  installed plugin included), with this test's own :class:`~btkit.testing.backends.Doubles`, used by
  btkit (CLI included) for the rest of the test;
- ``doubles``: that :class:`~btkit.testing.backends.Doubles`, to add a scripted backend of your own
  class with ``doubles.script(name, backend)``;
- ``scripted``: ``scripted(replies=[...], default=..., logprobs=..., ...) -> (backend, spec)``, a
  :class:`~btkit.testing.backends.ScriptedBackend` usable as ``--model spec`` whose ``history``
  holds every request it got;
- ``cli``: ``cli("run", "quiz", corpus, "-o", out, "--model", spec)`` runs ``btkit`` in process and
  returns click's ``Result``;
- :func:`btkit.testing.write_jsonl` and :func:`btkit.testing.read_jsonl` for corpora and outputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner, Result

from btkit import plugins
from btkit.testing.backends import DOUBLES_PLUGIN, Doubles, ScriptedBackend

__all__ = ["cli", "doubles", "isolated_cache", "registry", "scripted"]


def pytest_configure(config: pytest.Config) -> None:
    """Name the doubles in ``BTKIT_EXTRA_PLUGINS`` for the session (before collection, so module-level
    code and child processes see it too), after any modules already named; restored at the end."""
    before = os.environ.get(plugins.EXTRA_PLUGINS_ENV)
    named = plugins.extra_plugins_setting()
    if DOUBLES_PLUGIN not in named:
        os.environ[plugins.EXTRA_PLUGINS_ENV] = ",".join([*named, DOUBLES_PLUGIN])

    def restore() -> None:
        if before is None:
            os.environ.pop(plugins.EXTRA_PLUGINS_ENV, None)
        else:
            os.environ[plugins.EXTRA_PLUGINS_ENV] = before

    config.add_cleanup(restore)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own model-call cache (``BTKIT_CACHE_DIR``), so tests never see each other's completions."""
    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("BTKIT_CACHE_DIR", str(d))
    return d / "cache.sqlite"


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> plugins.Registry:
    """A fresh registry loaded from entry points, with this test's own doubles; also the one the CLI uses."""
    reg = plugins.Registry()
    if reg.pm.has_plugin(DOUBLES_PLUGIN):  # the stateless module plugin from BTKIT_EXTRA_PLUGINS
        reg.unregister(DOUBLES_PLUGIN)
    reg.register(Doubles(), name=DOUBLES_PLUGIN)
    monkeypatch.setattr(plugins, "_registry", reg)
    return reg


@pytest.fixture
def doubles(registry: plugins.Registry) -> Doubles:
    """This test's doubles: ``doubles.script(name, backend)`` makes ``scripted:NAME`` answer with ``backend``."""
    found = registry.pm.get_plugin(DOUBLES_PLUGIN)
    assert isinstance(found, Doubles), f"plugin {DOUBLES_PLUGIN} on the registry is {found!r}, not btkit.testing.backends.Doubles"
    return found


@pytest.fixture
def scripted(doubles: Doubles) -> Callable[..., tuple[ScriptedBackend, str]]:
    """``scripted(replies=[...], ...)`` -> (backend, spec) usable as ``--model spec``; keyword
    arguments are :class:`~btkit.testing.backends.ScriptedBackend`'s, ``name`` prefixes the spec."""
    made: list[ScriptedBackend] = []

    def make(name: str = "t", **kwargs: Any) -> tuple[ScriptedBackend, str]:
        backend = doubles.script(f"{name}{len(made)}", ScriptedBackend(**kwargs))
        made.append(backend)
        return backend, backend.spec

    return make


@pytest.fixture
def cli(registry: plugins.Registry) -> Callable[..., Result]:
    """Invoke ``btkit ...`` in process; returns click's Result (exit_code, output, stderr)."""
    from btkit.cli import cli as btkit_cli

    def invoke(*args: Any) -> Result:
        return CliRunner().invoke(btkit_cli, [str(a) for a in args], catch_exceptions=False)

    return invoke
