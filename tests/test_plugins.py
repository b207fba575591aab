"""The plugin system: entry-point discovery, registration by callback, record hooks, an out-of-tree plugin,
BTKIT_LOAD_PLUGINS and BTKIT_EXTRA_PLUGINS, and the test doubles kept out of production."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from btkit import hookspecs
from btkit.errors import BtkitError
from btkit.hookspecs import hookimpl
from btkit.methods import Method, StageInfo
from btkit.plugins import EXTRA_PLUGINS_ENV
from btkit.testing.backends import DOUBLES_PLUGIN, ScriptedBackend

from conftest import EXAMPLES, ROOT, read_jsonl, write_jsonl

LONG = " ".join(f"word{i}" for i in range(60))


def test_first_party_plugins_come_from_entry_points(registry):
    names = {r["name"]: r for r in registry.plugin_rows()}
    for name in ("llamacpp", "openai", "humpback", "eval_judge"):
        assert names[name]["distribution"] == "btkit"
        assert names[name]["version"]
    assert "humpback" in registry.methods()
    backends = registry.backends()
    assert backends["llamacpp"].plugin == "llamacpp"
    assert {backends[p].plugin for p in ("echo", "scripted", "det")} == {DOUBLES_PLUGIN}  # this test's doubles


# -- the test doubles are no production backends ------------------------------------------------------
def test_no_entry_point_is_a_test_double():
    from importlib import metadata

    from btkit.plugins import ENTRY_POINT_GROUP, KIND_GROUPS

    eps = {ep.name: ep.value for group in (ENTRY_POINT_GROUP, *KIND_GROUPS.values())
           for ep in metadata.entry_points(group=group) if ep.dist and ep.dist.name == "btkit"}
    assert {"humpback", "llamacpp"} <= set(eps)
    assert not [v for v in eps.values() if "testing" in v], eps


def _btkit(*args: str, **env: str | None) -> subprocess.CompletedProcess:
    """The real ``btkit`` in a fresh process, with ``env`` changed (None: unset)."""
    child = {**os.environ}
    for key, value in env.items():
        if value is None:
            child.pop(key, None)
        else:
            child[key] = value
    return subprocess.run([sys.executable, "-m", "btkit.cli", *args], env=child, capture_output=True, text=True, timeout=120)


def test_btkit_backends_lists_no_test_double_in_a_normal_install():
    r = _btkit("backends", BTKIT_EXTRA_PLUGINS=None, BTKIT_LOAD_PLUGINS=None)
    assert r.returncode == 0, r.stderr
    prefixes = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert {"llamacpp:", "openai:", "vllm:"} <= prefixes
    assert not prefixes & {"echo:", "scripted:", "det:"}, r.stdout

    r = _btkit("backends", BTKIT_EXTRA_PLUGINS=DOUBLES_PLUGIN, BTKIT_LOAD_PLUGINS=None)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
    assert {"llamacpp:", "echo:", "scripted:", "det:"} <= set(lines)
    assert lines["echo:"].endswith(f"(plugin {DOUBLES_PLUGIN})")


def test_the_pytest_plugin_names_the_doubles_for_child_processes(tmp_path):
    assert DOUBLES_PLUGIN in os.environ[EXTRA_PLUGINS_ENV].split(",")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": LONG}])
    r = _btkit("run", "humpback", str(corpus), "-o", str(tmp_path / "out"), "--model", "echo:What do the words list?",
               "--curate-mode", "rubric", "-q")
    assert r.returncode == 0, r.stderr  # echo: exists in the child
    assert [c["fields"]["instruction"] for c in read_jsonl(tmp_path / "out" / "candidates.jsonl")] == ["What do the words list?"]


def test_scripts_belong_to_one_registry(registry, doubles):
    """A script added in one test is not in another registry: no module-global table of scripts."""
    from btkit.plugins import Registry

    backend = doubles.script("mine", ScriptedBackend(default="hello"))
    assert registry.make_backend("scripted:mine") is backend and backend.spec == "scripted:mine"
    other = Registry()  # loads btkit.testing.backends from BTKIT_EXTRA_PLUGINS: its own, empty doubles
    assert other.backends()["scripted"].plugin == DOUBLES_PLUGIN
    with pytest.raises(BtkitError, match="no scripted backend named 'mine'"):
        other.make_backend("scripted:mine")


def test_core_imports_no_plugin():
    """btkit/ never imports btkit_plugins: first-party plugins are plugins like any other."""
    for path in (ROOT / "btkit").glob("*.py"):
        text = path.read_text()
        assert "import btkit_plugins" not in text and "from btkit_plugins" not in text, path


def test_every_hookspec_has_a_docstring():
    """(The plugin guide's coverage of every hook is tests/test_docs.py's.)"""
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("btkit_"):
            assert (fn.__doc__ or "").strip(), f"hook {name} has no docstring"


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

    from pluggy import PluginValidationError

    with pytest.raises(PluginValidationError, match="unknown hook 'btkit_no_such_hook'"):
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


# -- which plugins load: a broken third-party plugin, BTKIT_LOAD_PLUGINS ------------------------------
CONST_PLUGIN = '''
from btkit.backends import Backend, Completion
from btkit.hookspecs import hookimpl


class Const(Backend):
    def __init__(self, rest, options):
        self.spec = "const:" + rest

    async def chat(self, messages, params):
        return Completion(text="What does the word list contain?", finish_reason="stop")


@hookimpl
def btkit_register_backends(register):
    register("const", Const, description="always the same question")
'''


@pytest.fixture
def throwaway_dists(tmp_path, monkeypatch):
    """Two real distributions on sys.path, found by importlib.metadata like any installed one:
    ``btkit-broken-plugin`` 0.3 (plugin ``broken``, whose module raises on import) and
    ``btkit-const-plugin`` 1.0 (plugin ``const``, a backend that always asks the same question)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "btkit_broken_plugin.py").write_text('raise RuntimeError("boom at import")\n')
    (site / "btkit_const_plugin.py").write_text(CONST_PLUGIN)
    for dist, version, ep in (("btkit-broken-plugin", "0.3", "broken = btkit_broken_plugin"),
                              ("btkit-const-plugin", "1.0", "const = btkit_const_plugin")):
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[btkit]\n{ep}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("BTKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv(EXTRA_PLUGINS_ENV, raising=False)  # entry points only, unless a test names extras
    yield site
    for mod in ("btkit_broken_plugin", "btkit_const_plugin"):
        sys.modules.pop(mod, None)


BROKEN_WARNING = "warning: plugin broken (btkit-broken-plugin 0.3) failed to load: RuntimeError: boom at import; skipped"


def _fresh_registry(monkeypatch):
    from btkit import plugins

    reg = plugins.Registry()
    monkeypatch.setattr(plugins, "_registry", reg)
    return reg


def test_a_plugin_that_fails_to_import_is_skipped_with_one_warning(throwaway_dists, monkeypatch, capsys, tmp_path):
    reg = _fresh_registry(monkeypatch)
    assert capsys.readouterr().err.splitlines() == [BROKEN_WARNING]
    assert {"const", "llamacpp"} <= set(reg.backends()) and {"humpback", "quiz"} <= set(reg.methods())
    rows = {r["name"]: r for r in reg.plugin_rows()}
    assert rows["broken"]["status"] == "failed" and rows["broken"]["error"] == "RuntimeError: boom at import"
    assert rows["broken"]["distribution"] == "btkit-broken-plugin" and rows["broken"]["version"] == "0.3"
    assert rows["const"]["status"] == "loaded" and rows["const"]["distribution"] == "btkit-const-plugin"

    from btkit.cli import cli as btkit_cli

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": LONG}])
    r = CliRunner().invoke(btkit_cli, ["run", "quiz", str(corpus), "-o", str(tmp_path / "out"), "--model", "const:", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert read_jsonl(tmp_path / "out" / "data.jsonl")[0]["instruction"] == "What does the word list contain?"
    r = CliRunner().invoke(btkit_cli, ["plugins"], catch_exceptions=False)
    assert r.exit_code == 0
    line = next(l for l in r.output.splitlines() if l.startswith("broken "))
    assert "btkit-broken-plugin 0.3" in line and "FAILED: RuntimeError: boom at import" in line
    rows = {row["name"]: row for row in json.loads(CliRunner().invoke(btkit_cli, ["plugins", "--json"]).output)}
    assert rows["broken"]["status"] == "failed" and rows["humpback"]["status"] == "loaded"


def test_the_btkit_command_runs_with_a_broken_plugin_installed(throwaway_dists, tmp_path):
    """The real command in a fresh process: the run works, stderr says once what was skipped."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": LONG}])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(throwaway_dists), os.environ.get("PYTHONPATH", "")])}
    env.pop("BTKIT_LOAD_PLUGINS", None)
    cmd = [sys.executable, "-c", "from btkit.cli import cli; cli()"]
    r = subprocess.run([*cmd, "run", "quiz", str(corpus), "-o", str(tmp_path / "out"), "--model", "const:", "-q"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [l for l in r.stderr.splitlines() if l.startswith("warning:")] == [BROKEN_WARNING]
    assert read_jsonl(tmp_path / "out" / "data.jsonl")[0]["instruction"] == "What does the word list contain?"


def test_a_plugin_with_an_unknown_hook_is_skipped_not_fatal(throwaway_dists, monkeypatch, capsys):
    (throwaway_dists / "btkit_broken_plugin.py").write_text(
        "from btkit.hookspecs import hookimpl\n\n@hookimpl\ndef btkit_no_such_hook():\n    pass\n")
    reg = _fresh_registry(monkeypatch)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: plugin broken (btkit-broken-plugin 0.3) failed to load: PluginValidationError: ")
    assert "btkit_no_such_hook" in err[0] and err[0].endswith("; skipped")
    assert not reg.pm.has_plugin("broken") and "const" in reg.backends()


def test_load_plugins_pins_which_plugins_load(throwaway_dists, monkeypatch, capsys):
    monkeypatch.setenv("BTKIT_LOAD_PLUGINS", "humpback, const")
    reg = _fresh_registry(monkeypatch)
    assert capsys.readouterr().err == ""  # the broken plugin is not even imported
    assert {r["name"] for r in reg.plugin_rows()} == {"humpback", "const"}
    assert set(reg.backends()) == {"const"} and set(reg.methods()) == {"humpback"}


def test_load_plugins_takes_distribution_names(throwaway_dists, monkeypatch, capsys):
    monkeypatch.setenv("BTKIT_LOAD_PLUGINS", "btkit,BTKIT_CONST_PLUGIN")
    reg = _fresh_registry(monkeypatch)
    assert capsys.readouterr().err == ""
    names = {r["name"] for r in reg.plugin_rows()}
    assert {"humpback", "llamacpp", "eval_judge", "const"} <= names and not names & {"broken", "quiz"}


def test_load_plugins_empty_loads_none_and_unknown_names_are_reported(throwaway_dists, monkeypatch, capsys):
    monkeypatch.setenv("BTKIT_LOAD_PLUGINS", "")
    reg = _fresh_registry(monkeypatch)
    assert reg.plugin_rows() == [] and capsys.readouterr().err == ""
    with pytest.raises(BtkitError, match="known methods: none"):
        reg.method("humpback")
    reg.register(_Plugin(), name="mine")  # registration in code still works
    assert "m1" in reg.methods()

    monkeypatch.setenv("BTKIT_LOAD_PLUGINS", "humpback,nosuch")
    reg = _fresh_registry(monkeypatch)
    assert capsys.readouterr().err.splitlines() == [
        "warning: BTKIT_LOAD_PLUGINS names 'nosuch', which is no installed btkit plugin or distribution; ignored"]
    assert {r["name"] for r in reg.plugin_rows()} == {"humpback"}


# -- BTKIT_EXTRA_PLUGINS: modules registered besides the entry points -----------------------------------
def test_extra_plugins_load_whatever_load_plugins_says(throwaway_dists, monkeypatch, capsys):
    monkeypatch.setenv("BTKIT_LOAD_PLUGINS", "humpback")
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, f" btkit_const_plugin,{DOUBLES_PLUGIN}, btkit_const_plugin ")
    reg = _fresh_registry(monkeypatch)
    assert capsys.readouterr().err == ""
    rows = {r["name"]: r for r in reg.plugin_rows()}
    assert set(rows) == {"humpback", "btkit_const_plugin", DOUBLES_PLUGIN}
    assert rows["btkit_const_plugin"]["distribution"] == "(BTKIT_EXTRA_PLUGINS)" and rows["btkit_const_plugin"]["status"] == "loaded"
    assert set(reg.backends()) == {"const", "echo", "scripted", "det"}


def test_an_extra_module_that_is_also_an_entry_point_loads_once(throwaway_dists, monkeypatch, capsys):
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, "btkit_const_plugin")
    reg = _fresh_registry(monkeypatch)
    assert capsys.readouterr().err.splitlines() == [BROKEN_WARNING]
    names = {r["name"] for r in reg.plugin_rows()}
    assert "const" in names and "btkit_const_plugin" not in names
    assert reg.backends()["const"].plugin == "const"  # registered once: no "registered twice"


def test_an_extra_plugin_that_fails_is_skipped_with_one_warning(throwaway_dists, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("BTKIT_LOAD_PLUGINS", "quiz")
    monkeypatch.setenv(EXTRA_PLUGINS_ENV, f"btkit_broken_plugin,no_such_module_here,{DOUBLES_PLUGIN}")
    reg = _fresh_registry(monkeypatch)
    assert capsys.readouterr().err.splitlines() == [
        "warning: plugin btkit_broken_plugin (BTKIT_EXTRA_PLUGINS) failed to load: RuntimeError: boom at import; skipped",
        "warning: plugin no_such_module_here (BTKIT_EXTRA_PLUGINS) failed to load: "
        "ModuleNotFoundError: No module named 'no_such_module_here'; skipped",
    ]
    rows = {r["name"]: r for r in reg.plugin_rows()}
    assert rows["no_such_module_here"]["status"] == "failed" and rows["no_such_module_here"]["distribution"] == "(BTKIT_EXTRA_PLUGINS)"
    from btkit.cli import cli as btkit_cli

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": LONG}])
    r = CliRunner().invoke(btkit_cli, ["run", "quiz", str(corpus), "-o", str(tmp_path / "out"), "--model", "echo:Is it a list?", "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output  # every other plugin works
    assert read_jsonl(tmp_path / "out" / "data.jsonl")[0]["instruction"] == "Is it a list?"


# -- the out-of-tree example's own tests, run as its authors would run them -----------------------------
def test_the_example_plugin_imports_only_btkit_and_the_standard_library():
    """What a third party can rely on: btkit's public modules, never btkit_plugins (first-party internals)."""
    import ast

    package = EXAMPLES / "btkit-plugin-example" / "btkit_example_plugin"
    found = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {(path.name, alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add((path.name, node.module or ""))
    assert ("cloze.py", "btkit.backends") in found and ("quiz.py", "btkit.methods") in found
    outside = [(f, m) for f, m in found if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "btkit"]
    assert not outside, outside


def test_the_example_plugins_own_tests_pass():
    """examples/btkit-plugin-example/tests use the shipped pytest plugin like any third-party suite. They
    run in their own pytest process, from the example's folder: its own rootdir and conftest, nothing of
    btkit's tests/conftest.py, and BTKIT_EXTRA_PLUGINS left for the shipped plugin to set."""
    example = EXAMPLES / "btkit-plugin-example"
    env = {k: v for k, v in os.environ.items() if k not in (EXTRA_PLUGINS_ENV, "BTKIT_LOAD_PLUGINS", "PYTEST_ADDOPTS")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=example, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" not in summary, summary


def test_a_stage_kind_outside_the_vocabulary_is_refused(registry):
    class OddKind(_Plugin):
        @hookimpl
        def btkit_register_methods(self, register):
            register(Method(name="odd", description="d", stages=[StageInfo("s", "augmentation", (), ())], default_stages=("s",)))

    registry.register(OddKind(), name="odd")
    with pytest.raises(BtkitError, match="stage 's' has kind 'augmentation'; kinds: prepare, augment, curate"):
        registry.methods()


def test_help_imports_only_the_plugins_it_shows():
    """``btkit run METHOD --help`` imports method plugins and no backend; ``btkit --help`` no method (the
    entry-point group says what a plugin provides, btkit/plugins.py)."""
    probe = ("import sys; from btkit.cli import cli\n"
             "try:\n    cli(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if m.startswith('btkit_plugins.')), file=sys.stderr)")
    for args, present, absent in ((["run", "humpback", "--help"], "btkit_plugins.methods.humpback", "btkit_plugins.backends."),
                                  (["--help"], "btkit_plugins.commands.eval_judge", "btkit_plugins.methods.humpback")):
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        loaded = r.stderr.strip().splitlines()[-1]
        assert present in loaded, (args, loaded)
        assert absent not in loaded, (args, loaded)
