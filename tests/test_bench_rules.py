"""benchmarks/bench_rules.py: its two variants really differ by the rule, and the rules come back."""

import json
import pathlib
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_rules  # noqa: E402
from lazykernel import rules  # noqa: E402


def _tiny(monkeypatch):
    def tiny():
        model = lambda: nn.Sequential(nn.Linear(3, 4), nn.RMSNorm(4), nn.Tanh(), nn.Linear(4, 2))  # noqa: E731
        return {"tiny": (model, lambda: torch.randn(6, 3), (nn.RMSNorm,), "a tiny RMSNorm MLP")}
    monkeypatch.setattr(bench_rules, "workloads", tiny)


def test_the_generic_variant_runs_without_the_rule_and_restores_it(monkeypatch, tmp_path):
    _tiny(monkeypatch)
    before = dict(rules._RULES)
    out = tmp_path / "rules.json"
    assert bench_rules.main(["--workloads", "tiny", "--repeats", "2", "--json", str(out)]) == 0
    assert rules._RULES == before
    record = json.loads(out.read_text())["records"][0]
    assert "RMSNormRule" in record["rules_with"] and "RMSNormRule" not in record["rules_without"]
    assert "PerExampleJacobian" in record["rules_without"]
    assert len(record["times"]["rule"]) == len(record["times"]["generic"]) == 2
    assert record["max_rel_difference"] < 1e-5
    assert record["speedup"] == pytest.approx(record["generic_s"] / record["rule_s"])


def test_a_variant_without_rules_unregisters_them_until_restored():
    before = dict(rules._RULES)
    restore = bench_rules._without((nn.LSTM, nn.GRU))
    assert nn.LSTM not in rules._RULES
    restore()
    assert rules._RULES == before


def test_every_workload_builds_a_model_of_ten_outputs():
    for name, (build, inputs, types, _) in bench_rules.workloads().items():
        model = build().eval()
        x = inputs()[:2]
        assert model(x).shape == (2, 10), name
        assert all(t in rules._RULES for t in types), name
