"""Plugin manager: loads plugins from entry points and keeps the registries.

First-party plugins (``btkit_plugins.*``) are found exactly like third-party ones; the core imports
none of them. Registration happens through callbacks so the core owns validation and name clashes.

Entry-point groups say what a plugin provides, so btkit imports only what a command needs:
``btkit.methods``, ``btkit.backends``, ``btkit.commands`` and ``btkit.executors`` are loaded when methods, backends or
commands are first asked for (``btkit run METHOD --help`` imports no backend module, ``btkit
--help`` no method module), and ``btkit`` (any kind, or several) always with the first of them.
A plugin that provides two kinds names its module in both groups, under one name; a run, which calls
every hook, loads every group.

Which plugins load:

- ``BTKIT_LOAD_PLUGINS`` unset: every installed entry point of those groups.
- ``BTKIT_LOAD_PLUGINS=humpback,llamacpp,quiz``: only those. Each comma-separated item is a plugin
  (entry-point) name, or a distribution name that stands for all of its plugins, so
  ``BTKIT_LOAD_PLUGINS=btkit`` is btkit's own plugins without any third-party one, and
  ``BTKIT_LOAD_PLUGINS=btkit,quiz`` adds one. An item that names nothing installed is reported
  with one ``warning:`` line on stderr and ignored.
- ``BTKIT_LOAD_PLUGINS=`` (set but empty): no entry-point plugins at all, only those registered in
  code (:meth:`Registry.register`) or named by ``BTKIT_EXTRA_PLUGINS`` (below); with neither,
  btkit knows no method and no backend.

A plugin whose module fails to import (or that declares a hook btkit does not have) does not stop
btkit: it is skipped with one line on stderr, ``warning: plugin NAME (dist VERSION) failed to load:
ErrorType: message; skipped``, every other plugin works, and ``btkit plugins`` lists it as failed
(:attr:`Registry.failed`).

Plugins outside the entry points:

- ``BTKIT_EXTRA_PLUGINS=module.path[,other.module]``: those modules are imported and registered in
  addition to the entry-point plugins, whatever ``BTKIT_LOAD_PLUGINS`` says (naming a module is
  already a choice). This is how a process gets plugins that no installed distribution declares:
  btkit's test doubles (``btkit.testing.backends``: ``echo:``, ``scripted:FILE.json``,
  ``det:FILE.json``) in a ``btkit run`` child process of a test, or a plugin under development
  before it has a package. Each is listed by ``btkit plugins`` with the distribution
  ``(BTKIT_EXTRA_PLUGINS)``; one that fails to import is reported and skipped like a broken entry
  point: ``warning: plugin MODULE (BTKIT_EXTRA_PLUGINS) failed to load: ErrorType: message; skipped``.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

import pluggy

from . import hookspecs
from .backends import Backend, split_spec
from .errors import BtkitError
from .methods import STAGE_KINDS, Method

#: The entry-point group of a plugin of any kind (loaded whenever any kind is).
ENTRY_POINT_GROUP = "btkit"
#: The group of plugins of one kind, loaded when that kind is first asked for.
KIND_GROUPS = {"methods": "btkit.methods", "backends": "btkit.backends", "commands": "btkit.commands",
               "executors": "btkit.executors"}
#: Environment variable naming the plugins to load (see the module docstring).
LOAD_PLUGINS_ENV = "BTKIT_LOAD_PLUGINS"
#: Environment variable naming modules to register besides the entry points (see the module docstring).
EXTRA_PLUGINS_ENV = "BTKIT_EXTRA_PLUGINS"
#: What ``btkit plugins`` shows as the distribution of a plugin named by ``BTKIT_EXTRA_PLUGINS``.
EXTRA_PLUGINS_ORIGIN = f"({EXTRA_PLUGINS_ENV})"


def _normalize(name: str) -> str:
    """Distribution and plugin names compare as packaging does: case and ``-``/``_``/``.`` ignored."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def load_plugins_setting(environ: Any = None) -> set[str] | None:
    """The normalized names in ``BTKIT_LOAD_PLUGINS``; None when it is unset (load everything)."""
    value = (os.environ if environ is None else environ).get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    return {_normalize(item) for item in value.split(",") if item.strip()}


def extra_plugins_setting(environ: Any = None) -> list[str]:
    """The module paths in ``BTKIT_EXTRA_PLUGINS``, in order, each once; empty when it is unset."""
    value = (os.environ if environ is None else environ).get(EXTRA_PLUGINS_ENV, "")
    return list(dict.fromkeys(item.strip() for item in value.split(",") if item.strip()))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class ExportFormat:
    """A ``btkit export`` format: ``writer(rows, out, options) -> dict`` (see the hookspec)."""

    name: str
    writer: Callable[[list, Any, dict], dict]
    description: str
    suffix: str
    plugin: str


@dataclass
class ReportSection:
    """A section of the ``btkit report`` page: ``render(run_dir, context) -> str | None``."""

    name: str
    render: Callable[[Any, dict], str | None]
    order: float
    plugin: str


@dataclass
class ExecutorFactory:
    """A shard executor (``--executor NAME``): ``factory(options) -> btkit.executors.Executor``."""

    name: str
    factory: Callable[[dict], Any]
    description: str
    plugin: str


@dataclass
class BackendFactory:
    prefix: str
    factory: Callable[[str, dict[str, Any]], Backend]
    description: str
    plugin: str


class Registry:
    """Plugin manager plus the backends and methods plugins registered."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager("btkit")
        self.pm.add_hookspecs(hookspecs)
        self.dists: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        #: Plugins that failed to load: name -> (distribution, version, "ErrorType: message").
        self.failed: dict[str, tuple[str, str, str]] = {}
        #: Entry-point groups still to load (all of them are, lazily, unless ``load_entry_points`` is false).
        self._pending_groups: list[str] = [ENTRY_POINT_GROUP, *KIND_GROUPS.values()] if load_entry_points else []
        self._entry_points: dict[str, list[Any]] | None = None
        self._backends: dict[str, BackendFactory] | None = None
        self._methods: dict[str, Method] | None = None
        self._export_formats: dict[str, ExportFormat] | None = None
        self._report_sections: list[ReportSection] | None = None
        self._executors: dict[str, ExecutorFactory] | None = None
        if load_entry_points:
            self._load("none")  # the general group and BTKIT_EXTRA_PLUGINS now; the kinds when asked for

    def _load(self, *kinds: str) -> None:
        """Load the general group (and ``BTKIT_EXTRA_PLUGINS``) and those of ``kinds`` (all: none given)."""
        if not self._pending_groups:
            return
        groups = [KIND_GROUPS[k] for k in kinds if k in KIND_GROUPS] if kinds else list(KIND_GROUPS.values())
        first = ENTRY_POINT_GROUP in self._pending_groups
        for group in ([ENTRY_POINT_GROUP] if first else []) + groups:
            if group in self._pending_groups:
                self._pending_groups.remove(group)
                self._load_group(group)
                self._clear()
        if first:
            self._load_extra_plugins()
            self._warn_unmatched()

    def _all_entry_points(self) -> dict[str, list[Any]]:
        """btkit's entry points by group, read once (reading the installed metadata is not free)."""
        if self._entry_points is None:
            eps = metadata.entry_points()
            self._entry_points = {g: list(eps.select(group=g)) for g in (ENTRY_POINT_GROUP, *KIND_GROUPS.values())}
        return self._entry_points

    def _load_group(self, group: str) -> None:
        wanted = load_plugins_setting()
        for ep in self._all_entry_points()[group]:
            if self.pm.has_plugin(ep.name) or ep.name in self.failed:
                continue  # a plugin of two kinds is named in both groups: loaded once
            dist = ep.dist
            dist_name, version = (dist.name, dist.version) if dist else ("?", "?")
            if wanted is not None and not {_normalize(ep.name), _normalize(dist_name)} & wanted:
                continue
            try:
                module = ep.load()
                if self.pm.is_registered(module):  # also named by BTKIT_EXTRA_PLUGINS, already registered
                    continue
                self.pm.register(module, name=ep.name)
                self.pm.check_pending()  # a hook btkit does not have: this plugin fails, not the others
            except Exception as e:  # noqa: BLE001 (a broken plugin must not break btkit)
                if self.pm.has_plugin(ep.name):
                    self.pm.unregister(name=ep.name)
                why = f"{type(e).__name__}: {e}"
                self.failed[ep.name] = (dist_name, version, why)
                _warn(f"plugin {ep.name} ({dist_name} {version}) failed to load: {why}; skipped")
                continue
            self.dists[ep.name] = (dist_name, version)

    def _warn_unmatched(self) -> None:
        """One warning per ``BTKIT_LOAD_PLUGINS`` item that names no installed plugin or distribution."""
        wanted = load_plugins_setting()
        if not wanted:
            return
        known: set[str] = set()
        for eps in self._all_entry_points().values():
            for ep in eps:
                known.add(_normalize(ep.name))
                if ep.dist:
                    known.add(_normalize(ep.dist.name))
        for name in sorted(wanted - known):
            _warn(f"{LOAD_PLUGINS_ENV} names '{name}', which is no installed btkit plugin or distribution; ignored")

    def _load_extra_plugins(self) -> None:
        """Import and register the modules named by ``BTKIT_EXTRA_PLUGINS`` (entry points or not)."""
        for path in extra_plugins_setting():
            if self.pm.has_plugin(path) or path in self.failed:
                continue
            try:
                module = importlib.import_module(path)
                if self.pm.is_registered(module):  # also an entry point, already loaded under its own name
                    continue
                self.pm.register(module, name=path)
                self.pm.check_pending()
            except Exception as e:  # noqa: BLE001 (a broken plugin must not break btkit)
                if self.pm.has_plugin(path):
                    self.pm.unregister(name=path)
                why = f"{type(e).__name__}: {e}"
                self.failed[path] = (EXTRA_PLUGINS_ORIGIN, "", why)
                _warn(f"plugin {path} {EXTRA_PLUGINS_ORIGIN} failed to load: {why}; skipped")
                continue
            self.dists[path] = (EXTRA_PLUGINS_ORIGIN, "")

    def register(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object/module by hand (tests, embedding)."""
        registered = self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self._clear()
        return registered or ""

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._clear()

    def _clear(self) -> None:
        """Forget what plugins registered (a plugin came or went): asked again on next use."""
        self._backends = self._methods = None
        self._export_formats = None
        self._report_sections = None
        self._executors = None

    @property
    def hook(self) -> Any:
        """Every plugin's hooks (this loads every group: a hook may be implemented by a plugin of any kind)."""
        self._load()
        return self.pm.hook

    def register_commands(self, cli: Any) -> None:
        """Let plugins add their commands to ``cli`` (only the command plugins are loaded for it)."""
        self._load("commands")
        self.pm.hook.btkit_register_commands(cli=cli)

    # -- backends -------------------------------------------------------------------------
    def backends(self) -> dict[str, BackendFactory]:
        self._load("backends")
        if self._backends is None:
            found: dict[str, BackendFactory] = {}
            for impl in self.pm.hook.btkit_register_backends.get_hookimpls():
                plugin_name = self.pm.get_name(impl.plugin) or "?"

                def register(prefix: str, factory: Callable[..., Backend], description: str = "", _p=plugin_name) -> None:
                    if not prefix or ":" in prefix:
                        raise BtkitError(f"plugin '{_p}': backend prefix '{prefix}' must be non-empty and without ':'")
                    if prefix in found:
                        raise BtkitError(f"backend prefix '{prefix}' registered twice (plugins '{found[prefix].plugin}' and '{_p}')")
                    found[prefix] = BackendFactory(prefix, factory, description, _p)

                impl.function(register=register)
            self._backends = found
        return self._backends

    def make_backend(self, spec: str, options: dict[str, Any] | None = None) -> Backend:
        prefix, rest = split_spec(spec)
        factories = self.backends()
        if prefix not in factories:
            known = ", ".join(sorted(f"{p}:" for p in factories)) or "none"
            raise BtkitError(f"unknown backend '{prefix}' in model spec '{spec}'; known backends: {known}")
        backend = factories[prefix].factory(rest, dict(options or {}))
        backend.spec = backend.spec or spec
        return backend

    # -- methods --------------------------------------------------------------------------
    def methods(self) -> dict[str, Method]:
        self._load("methods")
        if self._methods is None:
            found: dict[str, Method] = {}
            for impl in self.pm.hook.btkit_register_methods.get_hookimpls():
                plugin_name = self.pm.get_name(impl.plugin) or "?"

                def register(method: Method, _p=plugin_name) -> None:
                    if not isinstance(method, Method):
                        raise BtkitError(f"plugin '{_p}' registered {method!r}, which is not a btkit.methods.Method")
                    if method.name in found:
                        raise BtkitError(f"method '{method.name}' registered twice (second by plugin '{_p}')")
                    for info in method.stages:
                        if info.kind not in STAGE_KINDS:
                            raise BtkitError(f"plugin '{_p}': method '{method.name}' stage '{info.name}' has kind '{info.kind}'; "
                                             f"kinds: {', '.join(STAGE_KINDS)}")
                    method.version = method.version or self.dists.get(_p, ("", ""))[1]
                    found[method.name] = method

                impl.function(register=register)
            self._methods = found
        return self._methods

    def method(self, name: str) -> Method:
        methods = self.methods()
        if name not in methods:
            raise BtkitError(f"unknown method '{name}'; known methods: {', '.join(sorted(methods)) or 'none'}")
        return methods[name]

    # -- export formats, report sections, executors ----------------------------------------------
    def _named(self, hook: str, what: str, make: Callable[..., Any], word: bool = True) -> dict[str, Any]:
        """Call every plugin's ``hook`` with a ``register`` callback; ``make(plugin, name, *args, **kwargs)``
        checks the arguments and builds the entry. A name is registered once, and must be a word (an
        option's value) unless ``word`` is false (a heading: any non-empty text)."""
        found: dict[str, Any] = {}
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            plugin_name = self.pm.get_name(impl.plugin) or "?"

            def register(name: str, *args: Any, _p: str = plugin_name, **kwargs: Any) -> None:
                if not name or not isinstance(name, str):
                    raise BtkitError(f"plugin '{_p}': a {what} needs a name")
                if word and not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
                    raise BtkitError(f"plugin '{_p}': {what} name '{name}' must be a word (letters, digits, - _ .)")
                if name in found:
                    raise BtkitError(f"{what} '{name}' registered twice (plugins '{found[name].plugin}' and '{_p}')")
                found[name] = make(_p, name, *args, **kwargs)

            impl.function(register=register)
        return found

    @staticmethod
    def _callable(plugin: str, what: str, name: str, role: str, fn: Any) -> Any:
        if not callable(fn):
            raise BtkitError(f"plugin '{plugin}': {what} '{name}' needs a callable {role}, got {fn!r}")
        return fn

    def export_formats(self) -> dict[str, ExportFormat]:
        """The ``btkit export`` formats by name (every group is loaded: any plugin may add one)."""
        self._load()
        if self._export_formats is None:
            def make(p: str, name: str, writer: Callable[..., dict], description: str = "", suffix: str = ".jsonl") -> ExportFormat:
                return ExportFormat(name, self._callable(p, "export format", name, "writer", writer), description, suffix, p)

            self._export_formats = self._named("btkit_register_export_formats", "export format", make)
        return self._export_formats

    def export_format(self, name: str) -> ExportFormat:
        formats = self.export_formats()
        if name not in formats:
            raise BtkitError(f"unknown export format '{name}'; known formats: {', '.join(sorted(formats)) or 'none'}")
        return formats[name]

    def report_sections(self) -> list[ReportSection]:
        """The ``btkit report`` sections, sorted by ``order`` then name (every group is loaded)."""
        self._load()
        if self._report_sections is None:
            def make(p: str, name: str, render: Callable[..., str | None], order: float = 100) -> ReportSection:
                return ReportSection(name, self._callable(p, "report section", name, "render", render), float(order), p)

            found = self._named("btkit_register_report_sections", "report section", make, word=False)
            self._report_sections = sorted(found.values(), key=lambda s: (s.order, s.name))
        return list(self._report_sections)

    def executors(self) -> dict[str, ExecutorFactory]:
        """The shard executors by name (``--executor``); only the executor plugins are loaded."""
        self._load("executors")
        if self._executors is None:
            def make(p: str, name: str, factory: Callable[[dict], Any], description: str = "") -> ExecutorFactory:
                return ExecutorFactory(name, self._callable(p, "executor", name, "factory", factory), description, p)

            self._executors = self._named("btkit_register_executors", "executor", make)
        return self._executors

    def executor(self, name: str) -> ExecutorFactory:
        executors = self.executors()
        if name not in executors:
            raise BtkitError(f"unknown executor '{name}'; known executors: {', '.join(sorted(executors)) or 'none'}")
        return executors[name]

    def plugin_rows(self) -> list[dict[str, str]]:
        """One row per plugin: loaded ones (``status`` ``loaded``, their hooks) and ones that failed
        to load (``status`` ``failed``, the ``error``)."""
        self._load()
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            dist, version = self.dists.get(name, ("(registered in code)", ""))
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            rows.append({"name": name, "distribution": dist, "version": version, "status": "loaded", "hooks": ", ".join(hooks)})
        for name, (dist, version, why) in self.failed.items():
            rows.append({"name": name, "distribution": dist, "version": version, "status": "failed", "hooks": "", "error": why})
        return sorted(rows, key=lambda r: r["name"])

    def prompt_roots(self) -> list:
        return [m.prompts_dir for m in self.methods().values() if m.prompts_dir]


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry
