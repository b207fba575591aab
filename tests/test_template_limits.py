"""A template cannot exhaust memory or run for ever: each render has a budget (btkit.prompts.
RenderBudget) of steps (loop iterations, outputs, items read), of characters written and of the size
of every value it builds. A hostile ``--prompts`` template that goes over it stops the run with one
line naming the template, under a 1 GB address-space limit, where it used to take gigabytes."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from btkit.errors import TemplateError
from btkit.prompts import MAX_PROMPT_CHARS, PromptLibrary

from conftest import write_jsonl, words

#: The issue's payloads (nested loops: 1.15 GB; a string doubled in a loop: 3.6-3.9 GB) and the
#: other ways to build a huge string in one step.
HOSTILE = {
    "nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "string_doubling": "{% set s = namespace(v='x') %}{% for i in range(30) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v|length }}",
    "join_huge_list": "{{ range(100000)|map('center', 100000)|join }}",
    "center_width": "{{ 'x'|center(900000000) }}",
    "format_width": "{{ '%900000000d'|format(1) }}",
}
ONE_GB = 1 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ONE_GB, ONE_GB))


@pytest.mark.slow
@pytest.mark.parametrize("payload", sorted(HOSTILE))
def test_hostile_template_stops_with_one_line_under_a_memory_limit(tmp_path, payload):
    prompts = tmp_path / "prompts" / "humpback"
    prompts.mkdir(parents=True)
    (prompts / "augment.j2").write_text("{% block user %}Write the request for: {{ text }} " + HOSTILE[payload] + "{% endblock %}")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(60)}])
    cmd = [sys.executable, "-m", "btkit.cli", "run", "humpback", str(corpus), "-o", str(tmp_path / "out"),
           "--model", "echo:", "--prompts", str(tmp_path / "prompts"), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory)
    output = proc.stdout + proc.stderr
    assert "MemoryError" not in output and "Traceback" not in output, output[-2000:]
    lines = [l for l in output.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, output[-2000:]
    assert lines[0].startswith("error: ") and "augment.j2" in lines[0]
    assert "template 'humpback/augment' went over a render limit" in lines[0]
    candidates = tmp_path / "out" / "candidates.jsonl"
    assert not candidates.exists() or candidates.read_text() == ""  # stopped at the first render, no record written


#: Every other way found to build far more than the budget, each stopped before it is built.
IN_PROCESS = {
    "silent_nested_loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    "list_of_big_strings": ("{% set s = 'x' * 1000000 %}{{ [s] * 1000 }}", "would build more than"),
    "str_of_list": ("{% set s = 'x' * 1000000 %}{{ ([s] * 1000)|string }}", "would build more than"),
    "nested_list_doubling": ("{% set ns = namespace(v=['x' * 100000]) %}{% for i in range(40) %}{% set ns.v = [ns.v, ns.v] %}{% endfor %}{{ ns.v }}",
                             "would build more than"),
    "macro_output_thrown_away": ("{% macro m() %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endmacro %}{% set x = m() %}ok",
                                 "the rendered prompt would be longer than"),
    "literal_text_in_loops": ("{% for i in range(100000) %}" + "z" * 1000 + "{% endfor %}", "the rendered prompt would be longer than"),
    "center_method": ("{{ 'x'.center(900000000) }}", "center would build"),
    "str_format_width": ("{{ '{:>900000000}'.format(1) }}", "str.format would build"),
    "percent_width": ("{{ '%900000000d' % 1 }}", "a % format would build"),
    "indent": ("{{ ('x\n' * 100000)|indent(100000) }}", "indent would build"),
    "replace_empty": ("{{ ('x' * 100000)|replace('', 'y' * 100000) }}", "replace would build"),
    "wordwrap": ("{{ ('x ' * 100000)|wordwrap(1, wrapstring='y' * 100000) }}", "wordwrap would build"),
    "expandtabs": ("{{ ('\t' * 100000).expandtabs(100000) }}", "expandtabs would build"),
    "translate": ("{{ ('x' * 100000).translate({120: 'y' * 100000}) }}", "translate would build"),
    "lipsum": ("{{ lipsum(100000, max=100000) }}", "lipsum would build"),
    "loop_length_of_lazy_items": ("{% for x in range(100000)|map('center', 1000000) %}{{ loop.length }}{% endfor %}", "a for loop's items"),
    "in_lazy_sequence": ("{{ 'z' in range(100000)|map('center', 1000000) }}", "reading a sequence"),
    "recursive_loop": ("{% for x in range(100000) recursive %}{% if loop.depth < 50 %}{{ loop(range(100000)) }}{% endif %}{% endfor %}",
                       "went over a render limit"),
    "integer_squaring": ("{% set ns = namespace(v=3) %}{% for i in range(40) %}{% set ns.v = ns.v * ns.v %}{% endfor %}{{ ns.v > 0 }}", "bits"),
    "tojson_growth": ("{% set ns = namespace(v='\"') %}{% for i in range(60) %}{% set ns.v = ns.v|tojson %}{% endfor %}{{ ns.v|length }}",
                      "filter 'tojson' would build"),
    "many_constant_filters": ("{{ 'x'|center(3999000) }}" * 300, "the rendered prompt would be longer than"),
}


def library_with(tmp_path, source: str, **kwargs) -> PromptLibrary:
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "t.j2").write_text(source)
    return PromptLibrary([tmp_path], **kwargs)


@pytest.mark.parametrize("case", sorted(IN_PROCESS))
def test_each_way_to_build_too_much_is_stopped_naming_the_template(tmp_path, case):
    source, message = IN_PROCESS[case]
    with pytest.raises(TemplateError) as e:
        library_with(tmp_path, source).render("m/t", {"text": "hello"})
    assert str(e.value).startswith(f"{tmp_path / 'm' / 't.j2'}: template 'm/t' went over a render limit: ")
    assert message in str(e.value)


def test_the_prompt_size_limit_is_stated_and_configurable(tmp_path):
    big_output = "{% for i in range(2000) %}" + "x" * 1000 + "{% endfor %}"  # 2 MB: fine by default
    assert len(library_with(tmp_path, big_output).render("m/t", {}).messages[-1]["content"]) == 2_000_000
    with pytest.raises(TemplateError, match="the rendered prompt would be longer than 1,000,000 characters"):
        library_with(tmp_path, big_output, max_prompt_chars=1_000_000).render("m/t", {})
    assert MAX_PROMPT_CHARS == 4_000_000


@pytest.mark.slow
def test_a_long_document_still_fits_in_the_shipped_templates(registry):
    """The budget grows with the variables: a 20 MB document renders (quoted once) in every
    template that shows it, although the fixed limit is 4 MB."""
    lib = PromptLibrary(registry.prompt_roots())
    doc = "word " * 4_000_000
    seed = [{"instruction": "What is apt?", "response": "A package manager."}]
    for name, variables in (("humpback/augment", {"text": doc, "examples": seed}), ("kun/augment", {"text": doc, "examples": seed}),
                            ("air/judge", {"instruction": "Q?", "document": doc, "answer": doc, "constraints": []})):
        content = lib.render(name, variables).messages[-1]["content"]
        assert content.count(doc.strip()) == (2 if name == "air/judge" else 1)


def test_ordinary_loops_filters_and_formats_still_work(tmp_path):
    source = ("{% for ex in examples %}{{ loop.index }}/{{ loop.length }}:{{ ex.q|upper }} {% endfor %}"
              "{{ range(100000)|sum }} {{ ['a', 'b']|join(', ') }} {{ '%5.1f'|format(3.14159) }} {{ '{:>4}'.format('r') }} "
              "{{ 'b' in ['a', 'b'] }} {{ 'x' ~ 2 }} {{ text|center(9) }} {{ 2 ** 64 }} {{ lipsum(1)|length > 0 }}")
    p = library_with(tmp_path, source).render("m/t", {"text": "hi", "examples": [{"q": "a"}, {"q": "b"}]})
    assert p.messages[-1]["content"] == "1/2:A 2/2:B 4999950000 a, b   3.1    r True x2     hi    18446744073709551616 True"
