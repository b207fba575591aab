"""Prompt templates: Jinja files the user owns, rendered in a sandbox.

A template lives at ``<root>/<method>/<stage>.j2`` and is named ``method/stage``. It may define
``{% block system %}``, ``{% block user %}`` and ``{% block assistant_prefix %}``; each block is
rendered on its own into one chat message, so corpus text (always a variable, never template source)
can never forge a role boundary. A template without blocks is the user message. Few-shot examples
as real chat turns (small chat models follow these far better than examples pasted into one
message): blocks ``example_user`` and ``example_assistant`` are rendered once per item of the
``examples`` variable, with the item as ``ex``, before the final user message.

Rendering uses an immutable sandbox with StrictUndefined: a template that reaches for Python
internals fails with a security error, and one that names an undefined variable fails when the
pipeline is built, before any model call.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import jinja2
from jinja2 import meta as jinja_meta
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .errors import TemplateError

BLOCKS = ("system", "user", "assistant_prefix")
EXAMPLE_BLOCKS = ("example_user", "example_assistant")


@dataclass(frozen=True)
class RenderedPrompt:
    """The chat messages a template produced, plus what identifies the template in lineage."""

    messages: list[dict[str, str]]
    assistant_prefix: str
    template: str
    template_hash: str


def _make_env(loader: jinja2.BaseLoader) -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


class PromptLibrary:
    """Finds templates by name across override folders (first) and method folders."""

    def __init__(self, roots: Iterable[Path | str] = (), overrides: Iterable[Path | str] = ()):
        self.overrides = [Path(p) for p in overrides]
        self.roots = [Path(p) for p in roots]
        for d in self.overrides:
            if not d.is_dir():
                raise TemplateError(f"{d}: --prompts must be a directory holding <method>/<stage>.j2 files")
        self.env = _make_env(jinja2.FileSystemLoader([str(p) for p in [*self.overrides, *self.roots]]))
        self._cache: dict[str, tuple[jinja2.Template, str, str]] = {}

    def add_root(self, root: Path | str) -> None:
        if Path(root) not in self.roots:
            self.roots.append(Path(root))
            self.env.loader = jinja2.FileSystemLoader([str(p) for p in [*self.overrides, *self.roots]])
            self._cache.clear()

    def names(self) -> list[str]:
        """All template names, ``method/stage``, overrides included."""
        found: set[str] = set()
        for root in [*self.overrides, *self.roots]:
            for f in root.glob("*/*.j2"):
                found.add(f"{f.parent.name}/{f.stem}")
        return sorted(found)

    def path(self, name: str) -> Path:
        for root in [*self.overrides, *self.roots]:
            p = root / f"{name}.j2"
            if p.is_file():
                return p
        raise TemplateError(f"no template named '{name}' (looked in: {', '.join(map(str, [*self.overrides, *self.roots])) or 'nowhere'})")

    def source(self, name: str) -> str:
        return self.path(name).read_text(encoding="utf-8")

    def _load(self, name: str) -> tuple[jinja2.Template, str, str]:
        if name not in self._cache:
            path = self.path(name)
            src = path.read_text(encoding="utf-8")
            try:
                tmpl = self.env.from_string(src)
            except jinja2.TemplateSyntaxError as e:
                raise TemplateError(f"{path}:{e.lineno}: template syntax error: {e.message}") from None
            digest = hashlib.sha256(src.encode("utf-8")).hexdigest()[:16]
            self._cache[name] = (tmpl, digest, str(path))
        return self._cache[name]

    def template_hash(self, name: str) -> str:
        return self._load(name)[1]

    def check_variables(self, name: str, provided: Iterable[str]) -> None:
        """Fail before any model call if the template uses a variable the stage does not provide."""
        path = self.path(name)
        src = path.read_text(encoding="utf-8")
        try:
            ast = self.env.parse(src)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{path}:{e.lineno}: template syntax error: {e.message}") from None
        missing = sorted(jinja_meta.find_undeclared_variables(ast) - set(provided) - set(self.env.globals) - {"ex"})
        if missing:
            raise TemplateError(
                f"{path}: template '{name}' uses undefined variable(s) {', '.join(missing)}; "
                f"available: {', '.join(sorted(provided))}"
            )

    def render(self, name: str, variables: dict[str, Any]) -> RenderedPrompt:
        tmpl, digest, path = self._load(name)
        try:
            ctx = tmpl.new_context(dict(variables))
            parts = {b: "".join(tmpl.blocks[b](ctx)) for b in BLOCKS if b in tmpl.blocks}
            parts = {b: (v if b == "assistant_prefix" else v.strip()) for b, v in parts.items()}
            if "user" not in parts:
                parts["user"] = tmpl.render(**variables).strip()
        except SecurityError as e:
            raise TemplateError(f"{path}: security error: template tried unsafe access ({e})") from None
        except jinja2.UndefinedError as e:
            raise TemplateError(f"{path}: undefined variable in template '{name}': {e.message}") from None
        messages = []
        if parts.get("system"):
            messages.append({"role": "system", "content": parts["system"]})
        if all(b in tmpl.blocks for b in EXAMPLE_BLOCKS):
            for ex in variables.get("examples") or []:
                try:
                    ectx = tmpl.new_context({**variables, "ex": ex})
                    for block, role in zip(EXAMPLE_BLOCKS, ("user", "assistant")):
                        messages.append({"role": role, "content": "".join(tmpl.blocks[block](ectx)).strip()})
                except SecurityError as e:
                    raise TemplateError(f"{path}: security error: template tried unsafe access ({e})") from None
                except jinja2.UndefinedError as e:
                    raise TemplateError(f"{path}: undefined variable in template '{name}': {e.message}") from None
        messages.append({"role": "user", "content": parts["user"]})
        return RenderedPrompt(messages, parts.get("assistant_prefix", ""), name, digest)
