"""A user template (``--prompts DIR``) that reaches for Python internals stops the run with one clear
TemplateError line, before any model call, never a traceback. Statically visible attempts are
refused when the pipeline is built; computed ones by the sandbox at the first render."""

from __future__ import annotations

import pytest

from btkit.errors import TemplateError
from btkit.prompts import PromptLibrary

from conftest import write_jsonl, words

STATIC = [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ joiner.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ ''|attr('__class__') }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ text.__len__() }}",
    "{{ examples|map(attribute='__class__')|list }}",
    "{{ examples|selectattr('__dict__')|list }}",
    "{{ ''.format.__self__ }}",
    "{{ text['__class__'] }}",
]
AT_RENDER = [
    ("{{ ''|attr('__cla' ~ 'ss__') }}", "security error"),
    ("{{ text|attr('_' ~ '_class__') }}", "security error"),
    ("{% set l = [] %}{{ l.append(1) }}", "security error"),
    ("{{ 'a' * 100000000 }}", "security error"),
    ("{{ 9 ** 99999999 }}", "security error"),
    ("{% for i in range(10**9) %}{% endfor %}", "security error"),
    ("{% include '/etc/passwd' %}", "includes a template that does not exist"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
]
UNDEFINED = ["{{ config.items() }}", "{{ request.application }}", "{{ url_for('index') }}", "{{ get_flashed_messages() }}"]


def augment_template(payload: str) -> str:
    return "{% block user %}Write the request for: {{ text }} " + payload + "{% endblock %}"


def run_with(cli, scripted, tmp_path, payload: str):
    backend, spec = scripted(default="What do these words mean together?", logprobs={"5": -0.1})
    prompts = tmp_path / "prompts" / "humpback"
    prompts.mkdir(parents=True)
    (prompts / "augment.j2").write_text(augment_template(payload))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": words(40, start=i * 100)} for i in range(3)])
    r = cli("run", "humpback", corpus, "-o", tmp_path / "out", "--model", spec, "--prompts", tmp_path / "prompts", "-q")
    return r, backend


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("payload", STATIC)
def test_reaching_for_internals_fails_before_any_model_call(cli, scripted, tmp_path, payload):
    r, backend = run_with(cli, scripted, tmp_path, payload)
    line = one_error_line(r)
    assert "security error" in line and "augment.j2" in line and "Python internals" in line
    assert backend.history == []
    assert not (tmp_path / "out" / "candidates.jsonl").exists()


@pytest.mark.parametrize("payload,message", AT_RENDER)
def test_computed_attempts_fail_at_the_first_render(cli, scripted, tmp_path, payload, message):
    r, backend = run_with(cli, scripted, tmp_path, payload)
    line = one_error_line(r)
    assert message in line and "augment.j2" in line
    assert backend.history == []  # the render comes before the call


@pytest.mark.parametrize("payload", UNDEFINED)
def test_web_framework_globals_do_not_exist(cli, scripted, tmp_path, payload):
    r, backend = run_with(cli, scripted, tmp_path, payload)
    line = one_error_line(r)
    assert "undefined variable" in line and "augment.j2" in line
    assert backend.history == []


def test_library_raises_template_error_for_each(registry, tmp_path):
    (tmp_path / "humpback").mkdir()
    lib = PromptLibrary(registry.prompt_roots(), [tmp_path])
    for payload in STATIC:
        (tmp_path / "humpback" / "augment.j2").write_text(augment_template(payload))
        lib._cache.clear()
        with pytest.raises(TemplateError, match="security error"):
            lib.check_variables("humpback/augment", ["text", "examples"])
    for payload, message in AT_RENDER:
        (tmp_path / "humpback" / "augment.j2").write_text(augment_template(payload))
        lib._cache.clear()
        lib.check_variables("humpback/augment", ["text", "examples"])
        with pytest.raises(TemplateError, match=message):
            lib.render("humpback/augment", {"text": "t", "examples": []})


def test_ordinary_templates_still_work(registry, tmp_path):
    """The checks do not get in the way of normal Jinja: filters, loops, self.block(), a modest '*'."""
    (tmp_path / "humpback").mkdir()
    (tmp_path / "humpback" / "augment.j2").write_text(
        "{% block system %}Be brief.{% endblock %}"
        "{% block user %}{{ self.system() }} {{ text|upper|replace('_', ' ') }} {{ '-' * 3 }} "
        "{% for ex in examples|sort(attribute='instruction') %}{{ loop.index }}:{{ ex.instruction }} {% endfor %}"
        "{{ examples|map(attribute='response')|join(',') }} {{ 2 ** 10 }}{% endblock %}")
    lib = PromptLibrary(registry.prompt_roots(), [tmp_path])
    lib.check_variables("humpback/augment", ["text", "examples"])
    p = lib.render("humpback/augment", {"text": "a_b", "examples": [{"instruction": "Q2", "response": "r2"}, {"instruction": "Q1", "response": "r1"}]})
    assert p.messages[-1]["content"] == "Be brief. A B --- 1:Q1 2:Q2 r2,r1 1024"
