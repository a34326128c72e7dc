"""The README as a reader uses it: its Python example runs as written (on the embedded default
model, offline), its set-up commands are the ones CI runs, the numbers and defaults it states are
the code's, its links lead somewhere, and every benchmark is listed in benchmarks/README.md."""
import re
from pathlib import Path

import pytest

from txl_fast.cli import SAMPLING, build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_readme_is_short():
    assert len(README.splitlines()) <= 150


@pytest.mark.parametrize("index", range(len(fenced(README, "python"))))
def test_readme_python_example_runs_as_written(index, capsys):
    exec(compile(fenced(README, "python")[index], f"README.md python block {index}", "exec"), {})
    out = capsys.readouterr().out
    assert out.strip(), "the example should print what it computes"
    if "perplexity" in fenced(README, "python")[index]:
        ppl = float(re.search(r"perplexity ([0-9.]+)", out).group(1))
        assert 1 < ppl < 2770                      # better than uniform over the default vocabulary


def test_readme_has_an_example():
    assert fenced(README, "python")


def test_setup_commands_are_what_ci_runs():
    commands = [block.strip() for block in fenced(README, "bash")]
    assert "pip install torch==2.13.0 && pip install . && txl-fast eval" in commands
    test_command = ("pip install torch==2.13.0 && pip install -e \".[test]\" && pip install --no-deps -r tests/requirements-speech.txt && python -m pytest -q && bash scripts/test_tf5.sh")
    assert test_command in commands
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command in ci


def test_readme_states_the_sampling_defaults_of_the_cli():
    """The defaults generate samples with (cli.SAMPLING: the flags default to None so that
    ``--greedy`` can refuse them), as the README and ``--help`` state them."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {a.dest: a.help for a in sub.choices["generate"]._actions}
    stated = f"temperature {SAMPLING['temperature']}, top-k {SAMPLING['top_k']}, top-p {SAMPLING['top_p']}"
    assert stated in README.replace("**", "")
    for name in ("temperature", "top_k", "top_p"):
        assert f"(default: {SAMPLING[name]})" in helps[name]


def test_readme_explains_threads_on_a_busy_machine():
    assert "--threads N" in README and "busy" in README


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(doc):
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_every_benchmark_is_listed_in_one_place():
    index = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "conftest.py")
    assert scripts and all(name in index for name in scripts), scripts
    assert "txl-fast bench" in index
    assert not list((ROOT / "scripts").glob("bench_*.py")), "benchmark scripts live in benchmarks/"


def test_how_fast_is_the_output_of_one_command():
    """The README's speed claims are one command's output: the command, the machine line it prints
    and its table, header and all (issue 16: no figure the command does not reproduce)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "benchmarks" / "bench_engine.py")
    bench_engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_engine)
    section = README.split("## How fast", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"^\s*(python benchmarks/bench_engine\.py[^\n]*)$", section, re.M)
    assert command, "the section names the command"
    bench_engine.parse_args(command.group(1).split()[2:])            # its flags are the script's
    assert re.search(r"^machine: .+ GFLOP/s, read [0-9.]+ GB/s", section, re.M), "the machine line it prints"
    table = bench_engine.format_rows([]).splitlines()
    assert table[0] in section and table[1] in section
