"""Memory planning: what `lazykernel.plan` predicts for the temporaries `ntk` makes, and the default budget."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import lazykernel
from lazykernel import _memory
from conftest import peak_allocated_bytes as _peak_allocated_bytes


class _TiedProjection(nn.Module):
    """One weight used as W and as Wᵀ: tied weights take the generic (per-example Jacobian) rule."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(h, d) / d ** 0.5)
        self.out = nn.Linear(d, 1)

    def forward(self, x):
        return self.out(torch.tanh(x @ self.w.T) @ self.w)


def test_plan_counts_the_gathered_rows_of_shared_embedding_tokens():
    # every example holds the same 8 distinct tokens: each pair of examples shares 8 rows
    torch.manual_seed(0)
    n, t, vocab, dim, outputs = 48, 8, 50, 32, 2
    model = nn.Sequential(nn.Embedding(vocab, dim), nn.Flatten(), nn.Linear(t * dim, outputs)).eval()
    x = torch.arange(t).repeat(n, 1)
    plan = lazykernel.plan(model, x)
    assert plan.groups[0].rule == "EmbeddingRule" and plan.groups[0].form == "tokens"
    assert plan.chunks == (n, n)
    # the token Gram gathers both rows of every matching pair: [pairs, O, D] twice
    pairs = n * n * t
    gathered = 2 * pairs * outputs * dim * 4
    assert plan.peak_bytes - plan.result_bytes >= gathered
    kernel = lazykernel.ntk(model, x)
    reference = lazykernel.ntk(model.double(), x, method="jacobian")
    torch.testing.assert_close(kernel.double(), reference, rtol=1e-5, atol=1e-5)


def test_plan_counts_three_jacobians_of_a_tied_weight_while_they_are_formed():
    torch.manual_seed(1)
    model = _TiedProjection(16, 128).eval()
    n = 32
    plan = lazykernel.plan(model, torch.randn(n, 16))
    assert [g.rule for g in plan.groups] == ["LinearRule", "PerExampleJacobian"]
    assert plan.chunks == (n, n)
    # one Jacobian per use of the weight, their sum, then it is copied into the operands
    jacobian = n * 1 * 128 * 16 * 4
    assert plan.peak_bytes - plan.result_bytes >= 3 * jacobian


def test_plan_counts_the_check_of_the_jacobians_on_the_probe_examples():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 3)).eval()
    x = torch.randn(9, 8)
    size = sum(p.numel() for p in model.parameters())
    tiny = 8 * 3 * size * 4    # fits one pair of examples' Jacobians, not the four checked
    # the check on the probe examples runs before any tile, inside the budget
    with pytest.raises(ValueError, match="to check itself on 4 example"):
        lazykernel.plan(model, x, method="jacobian", memory_budget=tiny)
    plan = lazykernel.plan(model, x, method="jacobian", memory_budget=2 * tiny)
    # the check forms the four probe examples' Jacobians [4, O, P] and copies them once
    assert plan.peak_bytes >= 2 * 4 * 3 * size * 4
    assert plan.peak_bytes <= 2 * tiny


def test_plan_chunks_are_python_integers_for_a_numpy_batch_size():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    plan = lazykernel.plan(model, torch.randn(12, 6), batch_size=np.int64(5))
    assert plan.chunks == (5, 5)
    assert all(type(chunk) is int for chunk in plan.chunks)
    assert json.loads(json.dumps({"chunks": plan.chunks})) == {"chunks": [5, 5]}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def cgroups(tmp_path, monkeypatch):
    """A fake /proc/self/cgroup and /sys/fs/cgroup, and 8 GiB available on the machine."""
    monkeypatch.setattr(_memory, "_PROC_CGROUP", str(tmp_path / "proc_cgroup"))
    monkeypatch.setattr(_memory, "_CGROUP_ROOT", str(tmp_path / "cgroup"))
    monkeypatch.setattr(_memory, "_meminfo_available_bytes", lambda: 8 << 30)
    return tmp_path


def test_default_budget_is_a_quarter_of_what_a_cgroup_v2_limit_leaves(cgroups):
    _write(cgroups / "proc_cgroup", "0::/kubepods/pod1\n")
    pod = cgroups / "cgroup" / "kubepods" / "pod1"
    _write(pod / "memory.max", "2147483648\n")
    _write(pod / "memory.current", "1073741824\n")
    _write(pod / "memory.stat", "anon 1\ninactive_file 536870912\n")
    _write(cgroups / "cgroup" / "memory.max", "max\n")
    # 2 GiB limit, 1 GiB used of which 512 MiB is reclaimable page cache: 1.5 GiB left
    assert _memory.default_memory_budget(torch.device("cpu")) == (3 << 30) // 2 // 4


def test_default_budget_reads_a_containers_cgroup_v1_at_the_mounts_root(cgroups):
    # inside a container the host's path is not visible; its own cgroup is the mount's root
    _write(cgroups / "proc_cgroup", "5:cpu:/\n4:memory:/docker/abc123\n")
    memory = cgroups / "cgroup" / "memory"
    _write(memory / "memory.limit_in_bytes", "1073741824\n")
    _write(memory / "memory.usage_in_bytes", "268435456\n")
    _write(memory / "memory.stat", "cache 5\ntotal_inactive_file 0\n")
    assert _memory.default_memory_budget(torch.device("cpu")) == (768 << 20) // 4


def test_default_budget_without_a_cgroup_limit_is_a_quarter_of_the_machines(cgroups):
    _write(cgroups / "proc_cgroup", "4:memory:/\n0::/\n")
    _write(cgroups / "cgroup" / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(cgroups / "cgroup" / "memory.max", "max\n")
    assert _memory.default_memory_budget(torch.device("cpu")) == (8 << 30) // 4


def test_ntk_gathers_shared_embedding_rows_in_batches_the_budget_holds(monkeypatch):
    # the gathered rows of both sides and their product are three tensors of at
    # most `max_pairs_elements` elements each: within the budget, not 3 × 16 MiB
    import importlib
    ntk_module = importlib.import_module("lazykernel.ntk")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 64), nn.Flatten(), nn.Linear(16 * 64, 3)).eval()
    x = torch.randint(0, 30, (64, 16))
    unbudgeted = lazykernel.ntk(model, x)
    budget = 8e6
    caps = []
    original = ntk_module.token_gram_accumulate

    def recording(out, rows1, rows2, output="trace", max_pairs_elements=1 << 22):
        caps.append(max_pairs_elements)
        return original(out, rows1, rows2, output, max_pairs_elements)

    monkeypatch.setattr(ntk_module, "token_gram_accumulate", recording)
    budgeted = lazykernel.ntk(model, x, memory_budget=budget)
    assert caps and max(caps) * 3 * 4 <= budget
    torch.testing.assert_close(budgeted, unbudgeted, rtol=1e-5, atol=1e-5)


class _MeanOverPositions(nn.Module):
    def forward(self, h):
        return h.mean(1)


def test_a_transformer_kernel_stays_within_a_tight_budget():
    # an embedding table whose rows every pair of examples shares, beside attention
    # and feed-forward terms in gradient form: the gathered rows, the gradient slabs
    # and the held operands together must fit in the budget
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(200, 64),
                          nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True),
                          _MeanOverPositions(), nn.Linear(64, 3)).eval()
    x = torch.randint(0, 200, (128, 16))
    budget = 43e6
    unbudgeted = lazykernel.ntk(model, x)
    result = {}
    peak = _peak_allocated_bytes(lambda: result.update(k=lazykernel.ntk(model, x, memory_budget=budget)))
    assert peak <= 1.02 * budget + unbudgeted.numel() * 4
    assert peak <= 1.02 * lazykernel.plan(model, x, memory_budget=budget).peak_bytes
    torch.testing.assert_close(result["k"], unbudgeted, rtol=1e-4, atol=1e-4)
