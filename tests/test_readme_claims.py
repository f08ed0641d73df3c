"""What the README states about the code: signatures, defaults, choices, commands,
files and figures, checked against the code and the result files it cites."""

import argparse
import ast
import importlib
import inspect
import json
import os
import re
import shlex
import sys

import pytest
import torch
from torch import nn

import lazykernel
from lazykernel import _memory, cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def _spans(text: str):
    """Inline code spans (single backticks, possibly across a line break), whitespace folded."""
    without_blocks = re.sub(r"```.*?```", "", text, flags=re.S)
    return [" ".join(span.split()) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", without_blocks)]


def _fenced(text: str, language: str):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


# -- signatures ---------------------------------------------------------------------

_SIGNATURE_SPAN = re.compile(r"^lazykernel\.([\w.]+)\((.*)\)$")

# every public callable whose signature the README must state in full
_DOCUMENTED = {
    "ntk", "plan", "ntk_to_disk", "jvp", "vjp", "ntk_vp", "linearize", "gram_hadamard_accumulate",
    "linear_jvp", "backend", "predict.gradient_descent_mse", "predict.gradient_descent_mse_cg",
    "infinite.ntk", "analysis.RegimeMonitor", "analysis.RegimeMonitor.verdict",
}


def _resolve(dotted: str):
    obj = lazykernel
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _real_parameters(dotted: str):
    obj = _resolve(dotted)
    parameters = list(inspect.signature(obj).parameters.values())
    if inspect.isfunction(obj) and "." in obj.__qualname__ and parameters and parameters[0].name == "self":
        parameters = parameters[1:]  # a method named through its class
    return parameters


def _stated_parameters(arguments: str):
    """(name, kind, default or inspect.Parameter.empty) of a README argument list."""
    try:
        tree = ast.parse(f"def stated({arguments}): pass")
    except SyntaxError as error:
        raise AssertionError(f"the README's argument list ({arguments}) is not a Python signature: {error}")
    args = tree.body[0].args
    stated = []
    positional = args.posonlyargs + args.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(positional, defaults):
        stated.append((arg.arg, "positional", default))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        stated.append((arg.arg, "keyword", inspect.Parameter.empty if default is None else default))
    assert args.vararg is None and args.kwarg is None, f"({arguments}) hides parameters behind * or **"
    return stated


def test_readme_signatures_match_the_code():
    found = {}
    for span in _spans(_readme()):
        match = _SIGNATURE_SPAN.match(span)
        if not match:
            continue
        dotted, arguments = match.groups()
        real = _real_parameters(dotted)
        stated = _stated_parameters(arguments)
        assert [name for name, _, _ in stated] == [p.name for p in real], \
            f"README states lazykernel.{dotted}({arguments}); the code has {inspect.signature(_resolve(dotted))}"
        for (name, kind, default), parameter in zip(stated, real):
            keyword_only = parameter.kind is inspect.Parameter.KEYWORD_ONLY
            assert (kind == "keyword") == keyword_only, f"lazykernel.{dotted}: {name} keyword-only is {keyword_only}"
            if default is not inspect.Parameter.empty:
                value = ast.literal_eval(default)
                assert parameter.default == value, \
                    f"README: lazykernel.{dotted}({name}={value!r}); the code's default is {parameter.default!r}"
        found[dotted] = span
    missing = _DOCUMENTED - set(found)
    assert not missing, f"the README states no full signature of {sorted(missing)}"


# -- defaults and choices ---------------------------------------------------------

def test_default_memory_budget_is_a_quarter_of_available_cpu_memory_and_half_of_free_cuda(monkeypatch):
    monkeypatch.setattr(_memory, "_available_cpu_bytes", lambda: 8 << 30)
    assert _memory.default_memory_budget(torch.device("cpu")) == 2 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 << 30, 80 << 30))
    assert _memory.default_memory_budget(torch.device("cuda", 0)) == 3 << 30


def test_the_choices_the_readme_lists_are_the_ones_accepted(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(4, 3)
    tangent = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"expected one of \('trace', 'diagonal', 'full'\)"):
        lazykernel.ntk(model, x, output="mean")
    with pytest.raises(ValueError, match=r"expected one of \('auto', 'structured', 'jacobian', 'ntvp'\)"):
        lazykernel.ntk(model, x, method="fast")
    with pytest.raises(ValueError, match=r"expected one of \('highest', 'tf32'\)"):
        lazykernel.ntk(model, x, precision="bf16")
    with pytest.raises(ValueError, match=r"expected one of \('auto', 'structured', 'generic'\)"):
        lazykernel.jvp(model, x, tangent, method="jacobian")
    with pytest.raises(ValueError, match=r"expected one of \('trace', 'full'\)"):
        lazykernel.ntk_vp(model, x, torch.randn(4, 2), output="diagonal")
    with pytest.raises(ValueError, match=r"expected one of \('resume', 'overwrite', 'error'\)"):
        lazykernel.ntk_to_disk(model, x, out=str(tmp_path / "K.npy"), if_exists="append")
    with pytest.raises(ValueError, match=r"expected one of \('relu', 'erf', 'identity'\)"):
        lazykernel.infinite.ntk(x, activation="tanh")
    assert lazykernel.analysis.PARAMETERIZATIONS == ("standard", "ntk", "mup")
    with pytest.raises(TypeError, match="progress"):
        lazykernel.plan(model, x, progress=True)  # the README: plan takes ntk's arguments but progress


def _parsed_cli(argv):
    """The namespace `lazykernel ARGV` parses to, without running the command."""
    seen = []
    runners = {name: getattr(cli, name) for name in ("_doctor", "_demo", "_ntk")}
    try:
        for name in runners:
            setattr(cli, name, lambda args: seen.append(args) or 0)
        assert cli.main(list(argv)) == 0
    finally:
        for name, runner in runners.items():
            setattr(cli, name, runner)
    return seen[0]


def test_cli_defaults_the_readme_states():
    ntk_args = _parsed_cli(["ntk", "--model", "m:f", "--data", "x.npy", "--out", "K.npy"])
    assert (ntk_args.dtype, ntk_args.output, ntk_args.method, ntk_args.precision, ntk_args.device) == \
        ("float32", "trace", "auto", "highest", "cpu")
    assert (ntk_args.memory_budget, ntk_args.resume, ntk_args.overwrite, ntk_args.quiet) == (None, False, False, False)
    sizes = [_parsed_cli(["ntk", "--model", "m:f", "--data", "x.npy", "--out", "K.npy", "--memory-budget", text])
             .memory_budget for text in ("8GB", "512MiB", "1000000")]
    assert sizes == [8 * 10**9, 512 * 2**20, 10**6]
    demo = _parsed_cli(["demo"])
    assert (demo.widths, demo.alphas, demo.alpha_width) == ([64, 128, 256, 512, 1024, 2048], [1.0, 4.0, 16.0, 64.0], 256)
    assert (demo.train_size, demo.test_size, demo.steps, demo.out) == (256, 256, 200, "lazykernel-demo")


# -- commands -----------------------------------------------------------------------

class _Parsed(Exception):
    pass


_BENCHMARK = re.compile(r"(?:^|\s|/)((?:bench_\w+|table|peer_neural_tangents)\.py)(?:\s|$)")


def _commands(text: str):
    """Shell commands (word lists) of the README's bash blocks, and the inline spans that are commands."""
    lines = []
    for block in _fenced(text, "bash"):
        lines.extend(block.replace("\\\n", " ").splitlines())
    for span in _spans(text):
        if "--" in span or _BENCHMARK.search(span) or re.match(r"^(python -m )?lazykernel \w+$", span):
            lines.append(span)
    commands = []
    for line in lines:
        command = []
        for word in shlex.split(line, comments=True) + ["&&"]:
            if word == "&&":
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(word)
    return commands


def _lazykernel_arguments(words):
    for i, word in enumerate(words):
        if word == "lazykernel" and (i == 0 or words[i - 1] == "-m"):
            return words[i + 1:]
    return None


def _parse_benchmark(script: str, argv, monkeypatch) -> argparse.Namespace:
    """The namespace a benchmark script parses ARGV to, stopping before it runs anything."""
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with monkeypatch.context() as patch:
        patch.syspath_prepend(os.path.join(REPO, "benchmarks"))
        module = importlib.import_module(script[:-3])
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        patch.setattr(sys, "argv", [script] + list(argv))
        with pytest.raises(_Parsed) as parsed:
            module.main(list(argv)) if inspect.signature(module.main).parameters else module.main()
    return parsed.value.args[0]


def test_readme_commands_parse(monkeypatch):
    checked = {"lazykernel": 0, "benchmarks": 0}
    for words in _commands(_readme()):
        arguments = _lazykernel_arguments(words)
        if arguments is not None:
            if "--help" in arguments:
                with pytest.raises(SystemExit) as done:
                    cli.main(arguments)
                assert done.value.code == 0, arguments
            else:
                _parsed_cli(arguments)
            checked["lazykernel"] += 1
            continue
        script = next((os.path.basename(w) for w in words if _BENCHMARK.search(" " + w + " ")), None)
        if script is not None:
            _parse_benchmark(script, words[[os.path.basename(w) for w in words].index(script) + 1:], monkeypatch)
            checked["benchmarks"] += 1
    assert checked["lazykernel"] >= 6 and checked["benchmarks"] >= 6, checked


def test_readme_setup_is_what_ci_installs():
    readme = _readme()
    with open(os.path.join(REPO, ".ci", "run")) as handle:
        ci = handle.read()
    with open(os.path.join(REPO, "pyproject.toml")) as handle:
        pyproject = handle.read()
    test_block = next(block for block in _fenced(readme, "bash") if ".[test]" in block)
    steps = [step.strip() for step in test_block.split("&&")]
    torch_install = next(step for step in steps if step.startswith("pip install torch=="))
    assert torch_install.replace("pip install", "pip install -q") in ci
    assert 'pip install -q --no-build-isolation -e ".[test]"' in ci and "python -m pytest -q" in ci
    assert steps[-1] == "python -m pytest -q"
    python = re.search(r"Python ≥ (\d+\.\d+)", readme).group(1)
    assert f'requires-python = ">={python}"' in pyproject
    minimum_torch = re.search(r"any torch ≥ (\d+\.\d+)", readme, flags=re.I).group(1)
    assert f'"torch>={minimum_torch}"' in pyproject
    for extra in re.findall(r'-e "\.\[(\w+)\]"', readme):
        assert re.search(rf"^{extra} = \[", pyproject, flags=re.M), extra


# -- files and figures --------------------------------------------------------------

def test_files_the_readme_names_exist():
    readme = _readme()
    paths = set(re.findall(r"(?<![\w/.$-])((?:benchmarks|docs|lazykernel|tests|csrc|examples|\.ci)/[\w./-]*\w)",
                           readme))
    assert len(paths) > 10
    missing = [path for path in sorted(paths) if not os.path.exists(os.path.join(REPO, path))]
    assert not missing, f"the README names files that do not exist: {missing}"
    layout = re.search(r"## Layout\n\n```\n(.*?)```", readme, flags=re.S).group(1)
    folder = None
    for line in layout.splitlines():
        head = re.match(r"^([\w.]+)/\s", line)
        folder = head.group(1) if head else folder
        for name in re.findall(r"([\w]+\.(?:py|cpp|sh)|[\w]+/)(?=[,) ]|$)", line[14:]):
            assert os.path.exists(os.path.join(REPO, folder, name)), f"Layout: {folder}/{name} does not exist"


def _render_table(path: str, capsys, monkeypatch) -> str:
    with monkeypatch.context() as patch:
        patch.syspath_prepend(os.path.join(REPO, "benchmarks"))
        table = importlib.import_module("table")
    capsys.readouterr()
    table.main([os.path.join(REPO, path)])
    return capsys.readouterr().out


@pytest.mark.parametrize("result", ["benchmarks/results/cpu_mlp.json", "benchmarks/results/cpu_cnn_transformer.json"])
def test_readme_benchmark_tables_are_the_result_files(result, capsys, monkeypatch):
    readme_lines = set(_readme().splitlines())
    rendered = [line for line in _render_table(result, capsys, monkeypatch).splitlines() if line.startswith("| ")]
    assert rendered
    missing = [line for line in rendered if line not in readme_lines]
    assert not missing, f"rows of {result} that the README does not show as rendered: {missing}"


def test_readme_demo_slopes_are_the_reports():
    with open(os.path.join(REPO, "docs", "demo", "results.json")) as handle:
        slopes = json.load(handle)["slopes"]
    readme = _readme()
    rows = {
        "relative parameter movement": ("ntk/parameter_movement", "mup/parameter_movement"),
        "relative kernel change": ("ntk/relative_kernel_change", "mup/relative_kernel_change"),
        "kernel distance": ("ntk/kernel_distance", "mup/kernel_distance"),
        "empirical vs analytic NTK error (init)": ("analytic/relative_error", None),
    }
    for label, keys in rows.items():
        row = re.search(rf"^\| {re.escape(label)} \|(.*)\|$", readme, flags=re.M)
        assert row, label
        cells = [cell.strip() for cell in row.group(1).split("|")]
        for cell, key in zip(cells, keys):
            if key is None:
                continue
            value, error = (float(part.replace("−", "-").replace("+", "")) for part in cell.split(" ± "))
            digits = len(cell.split(" ± ")[1].split(".")[1])
            assert value == round(slopes[key]["slope"], digits), (label, key, cell)
            assert error == round(slopes[key]["stderr"], digits), (label, key, cell)
