"""Plugin manager: loads plugins from the ``btkit`` entry-point group and keeps the registries.

First-party plugins (``btkit_plugins.*``) are found exactly like third-party ones; the core imports
none of them. Registration happens through callbacks so the core owns validation and name clashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

import pluggy

from . import hookspecs
from .backends import Backend, split_spec
from .errors import BtkitError
from .methods import Method

ENTRY_POINT_GROUP = "btkit"


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
        if load_entry_points:
            self._load_entry_points()
        self._backends: dict[str, BackendFactory] | None = None
        self._methods: dict[str, Method] | None = None

    def _load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.pm.has_plugin(ep.name):
                continue
            try:
                module = ep.load()
            except Exception as e:  # a broken third-party plugin must not break btkit
                raise BtkitError(f"plugin '{ep.name}' ({ep.value}) failed to load: {type(e).__name__}: {e}") from e
            self.pm.register(module, name=ep.name)
            dist = ep.dist
            self.dists[ep.name] = (dist.name if dist else "?", dist.version if dist else "?")
        self.pm.check_pending()

    def register(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin object/module by hand (tests, embedding)."""
        registered = self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self._backends = self._methods = None
        return registered or ""

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._backends = self._methods = None

    @property
    def hook(self) -> Any:
        return self.pm.hook

    # -- backends -------------------------------------------------------------------------
    def backends(self) -> dict[str, BackendFactory]:
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
        if self._methods is None:
            found: dict[str, Method] = {}
            for impl in self.pm.hook.btkit_register_methods.get_hookimpls():
                plugin_name = self.pm.get_name(impl.plugin) or "?"

                def register(method: Method, _p=plugin_name) -> None:
                    if not isinstance(method, Method):
                        raise BtkitError(f"plugin '{_p}' registered {method!r}, which is not a btkit.methods.Method")
                    if method.name in found:
                        raise BtkitError(f"method '{method.name}' registered twice (second by plugin '{_p}')")
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

    def plugin_rows(self) -> list[dict[str, str]]:
        rows = []
        for name, plugin in self.pm.list_name_plugin():
            dist, version = self.dists.get(name, ("(registered in code)", ""))
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            rows.append({"name": name, "distribution": dist, "version": version, "hooks": ", ".join(hooks)})
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
