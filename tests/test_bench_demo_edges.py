"""Edges of the benchmark scripts, the GPU check script and the demo.

The benchmarks' peers must compute the kernel lazykernel computes (float64
explicit-Jacobian reference), the scripts must refuse bad arguments before
running anything, keep what they measured when stopped part-way, and render
their JSON whole; ``gpu_check.sh`` is run with stand-ins for python3, timeout,
date and compute-sanitizer that record what it asks for and let every step use
all the time it is given; the demo validates its arguments before it trains and
judges its fitted slopes as the theory states them.
"""

import importlib.util
import json
import math
import os
import pathlib
import stat
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_ntk  # noqa: E402
import bench_products  # noqa: E402
import table  # noqa: E402
from workloads import make_mlp, make_small_cnn  # noqa: E402

import lazykernel  # noqa: E402
from lazykernel import demo  # noqa: E402
from lazykernel.analysis.sweep import SweepResult  # noqa: E402

from conftest import reference_ntk  # noqa: E402


class _SmallProbe(bench_ntk.GemmProbe):
    """The GEMM yardstick at 64 × 64, so that a whole benchmark run takes a moment."""

    def __init__(self, device):
        super().__init__(device)
        self.size = 64
        self.a, self.b = self.a[:64, :64].contiguous(), self.b[:64, :64].contiguous()


@pytest.fixture
def small_probe(monkeypatch):
    monkeypatch.setattr(bench_ntk, "GemmProbe", _SmallProbe)
    monkeypatch.setattr(bench_products, "GemmProbe", _SmallProbe)


# -- the torch.func tutorial's methods compute the requested mode ------------------

TUTORIAL_METHODS = [bench_ntk.tutorial_jacobian_contraction, bench_ntk.tutorial_ntk_vector_products]


@pytest.mark.parametrize("method", TUTORIAL_METHODS, ids=["jacobian", "ntvp"])
@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["x1-x1", "x1-x2"])
def test_tutorial_methods_match_the_reference_in_every_mode(method, output, symmetric):
    torch.manual_seed(0)
    model = make_mlp(6, 3, depth=2, d_in=5).double().eval()
    x1 = torch.randn(4, 5, dtype=torch.float64)
    x2 = x1 if symmetric else torch.randn(3, 5, dtype=torch.float64)
    expected = reference_ntk(model, x1, x2, output=output)
    got = method(model, x1, x2, output)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, lazykernel.ntk(model, x1, None if symmetric else x2, output=output),
                               rtol=1e-10, atol=1e-12)


def test_tutorial_methods_on_a_cnn_in_diagonal_mode():
    torch.manual_seed(1)
    model = make_small_cnn(3, channels=2).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = reference_ntk(model, x, output="diagonal")
    for method in TUTORIAL_METHODS:
        torch.testing.assert_close(method(model, x, x, "diagonal"), expected, rtol=1e-10, atol=1e-12)


# -- arguments are refused before anything runs --------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device, message", [("cuda", "no CUDA device"), ("gpu", "unknown device 'gpu'")])
def test_bench_ntk_refuses_a_device_it_cannot_use(device, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        bench_ntk.main(["--device", device, "--widths", "4", "--n", "2"])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--repeats", "--n", "--widths", "--outputs"])
def test_bench_ntk_refuses_sizes_below_one(flag, small_probe, capsys):
    argv = {"--repeats": "1", "--n": "2", "--widths": "4", "--outputs": "1"}
    argv[flag] = "0"
    with pytest.raises(SystemExit) as stopped:
        bench_ntk.main(["--methods", "structured", "--modes", "trace"]
                       + [word for pair in argv.items() for word in pair])
    assert stopped.value.code == 2
    assert f"{flag}: expected a positive integer, got '0'" in capsys.readouterr().err


def test_bench_products_refuses_zero_repeats(small_probe, capsys):
    with pytest.raises(SystemExit) as stopped:
        bench_products.main(["--sections", "op", "--widths", "8", "--n", "4", "--repeats", "0"])
    assert stopped.value.code == 2
    assert "--repeats: expected a positive integer, got '0'" in capsys.readouterr().err


def test_bench_products_refuses_a_cg_subsample_larger_than_the_cg_set(capsys):
    with pytest.raises(SystemExit) as stopped:
        bench_products.main(["--sections", "cg", "--cg-n", "40", "--cg-sub", "80"])
    assert stopped.value.code == 2
    assert "--cg-sub 80 is larger than --cg-n 40" in capsys.readouterr().err


# -- results survive an interrupted run and render whole -----------------------------

def _mlp_run(tmp_path, name, *extra):
    path = tmp_path / name
    bench_ntk.main(["--widths", "4", "--n", "3", "--outputs", "2", "--repeats", "1", "--json", str(path)]
                   + list(extra))
    with open(path) as handle:
        return json.load(handle)


def test_mlp_suite_keeps_its_results_when_stopped_part_way(tmp_path, small_probe, monkeypatch):
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # as when a time limit stops the run

    monkeypatch.setattr(bench_ntk, "plain_structured_ntk", stopped)
    path = tmp_path / "mlp.json"
    with pytest.raises(KeyboardInterrupt):
        bench_ntk.main(["--widths", "4", "--n", "3", "--outputs", "2", "--modes", "trace", "--methods",
                        "structured", "plain-structured", "--repeats", "1", "--json", str(path)])
    with open(path) as handle:
        data = json.load(handle)
    assert data["complete"] is False
    assert [(r["method"], r["status"]) for r in data["results"]] == [("structured", "ok")]


def test_mlp_table_round_trip(tmp_path, small_probe):
    # the full kernel (3·3·2·2 floats, 144 bytes) is over the limit, the trace (36 bytes) is not
    data = _mlp_run(tmp_path, "mlp.json", "--modes", "trace", "full", "--max-result-gib", str(100 / 2 ** 30),
                    "--methods", "structured", "structured-tf32", "plain-structured")
    text = table.render(data)
    rows = [line for line in text.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 2
    by_mode = {r["mode"]: r for r in data["results"] if r["method"] == "structured"}
    trace, full = by_mode["trace"], by_mode["full"]
    cells = rows[0].strip("|").split("|")
    assert [c.strip() for c in cells[:4]] == ["4", "3", "2", "trace"]
    assert cells[4].strip() == f"{trace['median_s']:.3g}"
    assert cells[-2].strip() == f"{trace['structured_flops'] / 1e9:.1f}"
    assert cells[-1].strip() == f"{100 * trace['fraction_of_gemm']:.0f}%"
    assert rows[1].split("|")[5:8] == [" skip ", " skip ", " skip "]
    # why a cell is not a time, and the TF32 methods' error, are said under the table
    assert full["note"] in text and "the kernel itself is" in full["note"]
    tf32 = next(r for r in data["results"] if r["method"] == "structured-tf32" and r["mode"] == "trace")
    assert f"{tf32['max_rel_diff_vs_float32']:.1e}" in text


def test_mlp_table_counts_flops_without_the_structured_method(tmp_path, small_probe):
    data = _mlp_run(tmp_path, "mlp.json", "--modes", "trace", "--methods", "plain-structured")
    assert [r["method"] for r in data["results"]] == ["plain-structured"]
    assert data["results"][0]["structured_flops"] > 0
    # at this size the count rounds to 0.0 GFLOP; scaled up, the column must show it
    data["results"][0]["structured_flops"] = 3.2e9
    row = next(line for line in table.render(data).splitlines() if line.startswith("| 4 |"))
    assert row.split("|")[-3].strip() == "3.2"


@pytest.mark.parametrize("name", ["cpu_products.json", "cpu_disk.json", "cpu_cg.json"])
def test_table_says_which_result_files_it_renders(name, capsys):
    path = REPO / "benchmarks" / "results" / name
    with pytest.raises(SystemExit) as stopped:
        table.main([str(path)])
    assert "bench_ntk.py" in str(stopped.value.code) and name in str(stopped.value.code)


# -- gpu_check.sh, rehearsed with stand-ins --------------------------------------------

_STUBS = {
    # records every call; answers what the script asks without running anything
    "python3": r"""#!/usr/bin/env bash
printf 'python3 %s\n' "$*" >>"$STUB_CALLS"
case "$*" in
  *"import hypothesis"*|*"import sklearn"*) exit 1 ;;
  *cuda_kernels*) [ -n "${STUB_NO_CUDA_KERNELS:-}" ] && exit 1; exit 0 ;;
  *"setup.py build_ext"*) [ -n "${STUB_SETUP_FAILS:-}" ] && exit 1; exit 0 ;;
esac
exit 0
""",
    # with STUB_SLOW, every command uses all of its limit and of its grace before KILL
    "timeout": r"""#!/usr/bin/env bash
grace=0
if [ "$1" = -k ]; then grace=$2; shift 2; fi
printf 'timeout %s\n' "$1" >>"$STUB_CALLS"
if [ -n "${STUB_SLOW:-}" ]; then echo $(( $(cat "$STUB_CLOCK") + ${1%s} + ${grace%s} )) >"$STUB_CLOCK"; fi
shift
"$@"
""",
    "date": r"""#!/usr/bin/env bash
if [ "${1:-}" = "+%s" ]; then cat "$STUB_CLOCK"; else echo 00:00:00; fi
""",
    "compute-sanitizer": r"""#!/usr/bin/env bash
printf 'compute-sanitizer %s\n' "$*" >>"$STUB_CALLS"
while [ $# -gt 0 ] && [ "$1" != python3 ]; do shift; done
"$@"
""",
    "nvidia-smi": "#!/usr/bin/env bash\necho stub GPU\n",
}


def _gpu_check(tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in _STUBS.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    calls, clock = tmp_path / "calls", tmp_path / "clock"
    calls.write_text("")
    clock.write_text("1000\n")
    run_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_CALLS=str(calls),
                   STUB_CLOCK=str(clock), **env)
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                          env=run_env, capture_output=True, text=True, timeout=60)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    return done.returncode, calls.read_text().splitlines(), int(clock.read_text()) - 1000, log


def test_gpu_check_ends_within_eight_minutes_even_when_every_step_runs_out_of_time(tmp_path):
    # the slowest path: setuptools' build fails late, the fallback build and every later step use their whole limit
    code, calls, elapsed, log = _gpu_check(tmp_path, STUB_SETUP_FAILS="1", STUB_SLOW="1")
    assert any("build_ext" in c for c in calls) and any(c.startswith("python3 -") for c in calls), calls
    assert elapsed <= 480, (elapsed, [c for c in calls if c.startswith("timeout")])


def test_gpu_check_runs_the_cuda_tests_without_the_optional_test_packages(tmp_path):
    code, calls, elapsed, log = _gpu_check(tmp_path)
    # every run that collects the whole tests/ folder, the CUDA tests' among them
    whole = [c for c in calls if c.startswith("python3 -m pytest") and " tests/ " in c + " "]
    assert any("-m cuda" in c for c in whole), calls
    for call in whole:  # a test module that imports hypothesis at the top would stop the collection
        assert "--ignore=tests/test_ntk.py" in call and "--ignore=tests/test_random_architectures.py" in call
    assert code == 0, log


def test_gpu_check_sanitizer_subset_selects_tests(tmp_path):
    code, calls, elapsed, log = _gpu_check(tmp_path)
    sanitized = [c for c in calls if c.startswith("compute-sanitizer") and "pytest" in c]
    assert sanitized, calls
    words = sanitized[-1].split(" -m pytest ", 1)[1]
    # the -k expression has spaces; it is the part after -k up to the end
    before, expression = words.split(" -k ", 1)
    args = [w for w in before.split() if w not in ("-q",)]
    collected = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                                *args, "-k", expression.strip().strip('"')], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert "no tests collected" not in collected.stdout, collected.stdout[-500:]
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert any("test_cuda_opcheck" in i for i in ids) and any("kernel_matches_reference" in i for i in ids)


def test_gpu_check_fails_when_the_cuda_kernels_did_not_load(tmp_path):
    code, calls, elapsed, log = _gpu_check(tmp_path, STUB_NO_CUDA_KERNELS="1")
    assert code != 0
    assert "CUDA kernels did not load" in log


# -- the demo ------------------------------------------------------------------------------

_TINY = dict(widths=(16, 32, 64), steps=2, alphas=(1.0, 8.0), alpha_width=16, train_size=24, test_size=8,
             probe_size=6, progress=False)


# the runs below load the digits (scikit-learn); the argument checks come before that
needs_digits = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                  reason="the demo's digits come with scikit-learn")


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the demo trained before checking its arguments")

    monkeypatch.setattr(demo, "width_sweep", refuse)


@pytest.mark.parametrize("change, message", [
    (dict(widths=(32, 32, 32)), "distinct"),
    (dict(widths=(16, 16, 32)), "distinct"),
    (dict(alphas=(1.0, 1.0)), "distinct"),
    (dict(alphas=(1.0,)), "at least 2"),
    (dict(alphas=(0.0, 1.0)), "alphas"),
    (dict(alpha_width=0), "alpha_width"),
    (dict(probe_size=30), "probe_size"),
])
def test_demo_checks_its_arguments_before_training(change, message, tmp_path, no_training):
    with pytest.raises(ValueError, match=message):
        demo.run_demo(str(tmp_path), **{**_TINY, **change})


def _power_law_sweeps(monkeypatch, exponents):
    """width_sweep replaced by exact power laws of width (and α), so the verdicts are known."""

    def sweep(train_x, train_y, test_x, test_y, *, widths, parameterization, alphas=(None,), **kwargs):
        result = SweepResult()
        for width in widths:
            for alpha in alphas:
                scale = 1.0 if alpha is None else 1.0 / alpha ** 2
                row = {"width": width, "alpha": alpha, "test_accuracy": 0.5, "kernel_test_accuracy": 0.5,
                       "linearization_gap": 0.1, "verdict": "lazy"}
                for metric, exponent in exponents[parameterization].items():
                    row[metric] = scale * width ** exponent
                result.rows.append(row)
                result.histories.append([{"step": 0, "linearization_gap": 0.1}])
        return result

    def analytic(train_x, widths, probe_size, seed, device):
        return [{"width": w, "relative_error": w ** -0.5, "per_seed": [w ** -0.5]} for w in widths]

    monkeypatch.setattr(demo, "width_sweep", sweep)
    monkeypatch.setattr(demo, "_analytic_errors", analytic)
    monkeypatch.setattr(demo, "_plot", lambda *args: None)


@needs_digits
def test_demo_kernel_change_is_judged_against_its_bound(tmp_path, monkeypatch):
    # Lee et al. (2019) bound the NTK-parameterization kernel change by O(width^-1/2); here it falls like
    # width^-0.9, which agrees, while the parameter movement must fall like width^-1/2 itself
    _power_law_sweeps(monkeypatch, {
        "ntk": {"relative_kernel_change": -0.9, "parameter_movement": -0.9, "kernel_distance": -1.8},
        "mup": {"relative_kernel_change": 0.0, "parameter_movement": 0.0, "kernel_distance": 0.0}})
    results = demo.run_demo(str(tmp_path), **_TINY)
    slopes = results["slopes"]
    assert math.isclose(slopes["ntk/relative_kernel_change"]["slope"], -0.9, abs_tol=1e-9)
    assert slopes["ntk/relative_kernel_change"]["within"] is True
    assert slopes["ntk/parameter_movement"]["within"] is False
    report = (tmp_path / "report.md").read_text()
    assert "| ntk/relative_kernel_change | -0.900 ± 0.000 | ≤ -0.5 | yes |" in report
    assert "| ntk/parameter_movement | -0.900 ± 0.000 | -0.5 | no |" in report


@needs_digits
def test_demo_alpha_verdict_follows_increasing_alpha(tmp_path, monkeypatch):
    _power_law_sweeps(monkeypatch, {p: {"relative_kernel_change": -0.5, "parameter_movement": -0.5,
                                        "kernel_distance": -1.0} for p in ("ntk", "mup")})
    # the kernel change falls like 1/α², whatever order the α values are given in
    results = demo.run_demo(str(tmp_path), **{**_TINY, "alphas": (8.0, 1.0, 4.0)})
    assert results["settings"]["alphas"] == [1.0, 4.0, 8.0]
    assert [r["alpha"] for r in results["runs"]["alpha"]] == [1.0, 4.0, 8.0]
    assert results["alpha_lazier_as_alpha_grows"] is True
    assert "decreases with every increase of α: yes" in (tmp_path / "report.md").read_text()


def test_bench_disk_refuses_zero_repeats(monkeypatch, capsys):
    import bench_disk

    monkeypatch.setattr(sys, "argv", ["bench_disk.py", "--skip", "big", "ranks", "--n-compare", "4", "--width", "4",
                                      "--d-in", "3", "--repeats", "0"])
    with pytest.raises(SystemExit) as stopped:
        bench_disk.main()
    assert stopped.value.code == 2
    assert "--repeats: expected a positive integer, got '0'" in capsys.readouterr().err
