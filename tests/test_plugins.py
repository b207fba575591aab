"""The plugin system: entry-point discovery, registration by callback, record hooks, an out-of-tree plugin."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from btkit import hookspecs
from btkit.errors import BtkitError
from btkit.hookspecs import hookimpl
from btkit.methods import Method, StageInfo

from conftest import ROOT, read_jsonl, write_jsonl

LONG = " ".join(f"word{i}" for i in range(60))


def test_first_party_plugins_come_from_entry_points(registry):
    names = {r["name"]: r for r in registry.plugin_rows()}
    for name in ("llamacpp", "fake", "humpback"):
        assert names[name]["distribution"] == "btkit"
        assert names[name]["version"]
    assert "humpback" in registry.methods()
    assert {"llamacpp", "echo", "scripted"} <= set(registry.backends())


def test_core_imports_no_plugin():
    """btkit/ never imports btkit_plugins: first-party plugins are plugins like any other."""
    for path in (ROOT / "btkit").glob("*.py"):
        text = path.read_text()
        assert "import btkit_plugins" not in text and "from btkit_plugins" not in text, path


def test_every_hookspec_is_documented():
    readme = (ROOT / "README.md").read_text()
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("btkit_"):
            assert (fn.__doc__ or "").strip(), f"hook {name} has no docstring"
            assert name in readme, f"hook {name} is not documented in README.md"


def test_plugins_cli_lists_versions(cli):
    r = cli("plugins", "--json")
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert rows["humpback"]["version"] and "btkit_register_methods" in rows["humpback"]["hooks"]


def test_out_of_tree_example_plugin_is_discovered(registry):
    """examples/btkit-plugin-example is installed as its own distribution (README's test command does it)."""
    rows = {r["name"]: r for r in registry.plugin_rows()}
    assert "quiz" in rows, "install it: pip install -e examples/btkit-plugin-example"
    assert rows["quiz"]["distribution"] == "btkit-plugin-example"
    method = registry.method("quiz")
    assert method.prompts_dir and (Path(method.prompts_dir) / "quiz" / "ask.j2").is_file()


def test_out_of_tree_method_runs_with_its_own_template_and_filter(cli, scripted, tmp_path):
    backend, spec = scripted(replies=["What does the word list contain?", "Not a question."])
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": LONG}, {"id": "b", "text": LONG + " more"}])
    r = cli("run", "quiz", corpus, "-o", tmp_path / "out", "--model", spec, "-q")
    assert r.exit_code == 0, r.output
    assert "quiz question" in backend.history[0]["messages"][-1]["content"]
    cands = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    assert [c["status"] for c in cands] == ["kept", "dropped"]
    assert cands[1]["reason"] == "not_a_question" and cands[1]["dropped_at"] == "quiz.ask"
    assert read_jsonl(tmp_path / "out" / "data.jsonl")[0]["instruction"] == "What does the word list contain?"


class _Plugin:
    def __init__(self, method_name="m1", prefix="p1"):
        self.method_name, self.prefix = method_name, prefix

    @hookimpl
    def btkit_register_methods(self, register):
        register(Method(name=self.method_name, description="d", stages=[StageInfo("s", "augment", (), ())], default_stages=("s",)))

    @hookimpl
    def btkit_register_backends(self, register):
        register(self.prefix, lambda rest, opts: None, description="x")


def test_registration_in_code_and_unregister(registry):
    registry.register(_Plugin(), name="mine")
    assert "m1" in registry.methods() and "p1" in registry.backends()
    registry.unregister("mine")
    assert "m1" not in registry.methods()


def test_name_clashes_are_refused(registry):
    registry.register(_Plugin(method_name="humpback", prefix="zz"), name="clash")
    with pytest.raises(BtkitError, match="method 'humpback' registered twice"):
        registry.methods()
    registry.unregister("clash")
    registry.register(_Plugin(method_name="okname", prefix="llamacpp"), name="clash2")
    with pytest.raises(BtkitError, match="backend prefix 'llamacpp' registered twice"):
        registry.backends()


def test_unknown_hook_is_refused(registry):
    class Bad:
        @hookimpl
        def btkit_no_such_hook(self):
            pass

    with pytest.raises(Exception):
        registry.register(Bad(), name="bad")


class _Filter:
    """A filter plugin that drops pairs whose instruction mentions 'forbidden' and tags the rest."""

    seen: list

    def __init__(self):
        self.seen = []

    @hookimpl
    def btkit_before_stage(self, record, stage, run):
        self.seen.append((stage.label, record.id))

    @hookimpl
    def btkit_after_stage(self, record, stage, run):
        if stage.name == "augment":
            if "forbidden" in record.fields["instruction"]:
                return "mentions_forbidden"
            record.fields["instruction"] = record.fields["instruction"] + " (checked)"
        return None


def test_record_hooks_observe_change_and_drop(registry, cli, scripted, tmp_path):
    flt = _Filter()
    registry.register(flt, name="filter")
    backend, spec = scripted(replies=["Is this forbidden knowledge?", "What are the words?"], logprobs={"5": -0.1})
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": LONG}, {"id": "b", "text": LONG + " tail"}])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "-q")
    assert r.exit_code == 0, r.output
    cands = {c["id"]: c for c in read_jsonl(tmp_path / "out" / "candidates.jsonl")}
    assert cands["a#0"]["reason"] == "mentions_forbidden" and cands["a#0"]["dropped_at"] == "humpback.augment"
    assert cands["b#0"]["fields"]["instruction"] == "What are the words? (checked)"
    assert ("humpback.curate", "b#0") in flt.seen and ("humpback.curate", "a#0") not in flt.seen
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["dropped_by_reason"] == {"humpback.augment:mentions_forbidden": 1}
