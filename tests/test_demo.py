"""`lazykernel demo` with tiny settings: the report is written, sane and deterministic."""

import json
import math

import pytest
import torch

from lazykernel.cli import main
from lazykernel.demo import load_digits, run_demo

TINY = dict(widths=(16, 32, 64), steps=12, alphas=(1.0, 8.0), alpha_width=32, train_size=48, test_size=32,
            probe_size=12)
FIGURES = ("kernel_vs_width.png", "parameter_movement_vs_width.png", "linearization_gap.png",
           "analytic_ntk_error.png", "accuracy_vs_kernel_regression.png", "alpha_sweep.png")


def test_digits_are_bundled_and_normalised():
    train_x, train_y, test_x, test_y = load_digits(100, 50, seed=3)
    assert train_x.shape == (100, 64) and test_x.shape == (50, 64)
    assert set(train_y.tolist()) <= set(range(10))
    norms = train_x.double().norm(dim=1)
    assert norms.sub(8.0).abs().max().item() < 1e-4  # ‖x‖² = d = 64
    with pytest.raises(ValueError, match="train_size"):
        load_digits(1700, 200)


@pytest.fixture
def one_thread():
    # as the command line does by default: tiny matrices, and a shared CI machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_demo_writes_a_sane_deterministic_report(tmp_path, one_thread):
    results = run_demo(str(tmp_path / "a"), progress=False, **TINY)
    for name in FIGURES + ("report.md", "results.json"):
        path = tmp_path / "a" / name
        assert path.exists() and path.stat().st_size > 0, name
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| width |" in report and "verdict" in report
    assert len(results["runs"]["ntk"]) == 3 and len(results["runs"]["mup"]) == 3
    assert [r["alpha"] for r in results["runs"]["alpha"]] == [1.0, 8.0]
    for rows in results["runs"].values():
        for row in rows:
            assert row["verdict"] in ("lazy", "mixed", "feature-learning")
            assert 0.0 <= row["test_accuracy"] <= 1.0
            assert row["relative_kernel_change"] > 0 and math.isfinite(row["linearization_gap"])
    for entry in results["slopes"].values():
        assert math.isfinite(entry["slope"]) and entry["stderr"] >= 0
    # even this tiny run shows the direction of the known results
    assert results["slopes"]["ntk/parameter_movement"]["slope"] < -0.3
    assert results["alpha_lazier_as_alpha_grows"]
    errors = [r["relative_error"] for r in results["analytic"]]
    assert errors[-1] < errors[0]

    # the command line, same seed: the same numbers
    assert main(["demo", "--out", str(tmp_path / "b"), "--no-progress", "--widths", "16", "32", "64",
                 "--steps", "12", "--alphas", "1", "8", "--train-size", "48", "--test-size", "32",
                 "--probe-size", "12", "--alpha-width", "32"]) == 0
    with open(tmp_path / "b" / "results.json") as handle:
        again = json.load(handle)
    assert again["runs"] == json.loads(json.dumps(results["runs"]))
    assert again["analytic"] == json.loads(json.dumps(results["analytic"]))
