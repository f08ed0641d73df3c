"""lazykernel.plan against what ntk computes and allocates, and the memory helpers' edge cases."""

import importlib

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lazykernel
from lazykernel import _memory
from conftest import assert_close_to_reference, reference_ntk
from conftest import peak_allocated_bytes as _peak_allocated_bytes

ntk_module = importlib.import_module("lazykernel.ntk")


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).to(dtype).eval()


def _counted_tile_flops(model, x1, x2, output, method, budget=None) -> float:
    """FLOPs of ntk's tiles alone (after the arguments are checked and the engine is built)."""
    call = ntk_module._setup(model, x1, x2, output, method, None, None, budget, "highest")
    counter = FlopCounterMode(display=False)
    with counter:
        ntk_module._compute(call, x1, None, False)
    return float(counter.get_total_flops())


# -- the returned kernel of a half-precision model ------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plan_counts_the_returned_kernel_in_a_half_precision_models_dtype(dtype):
    # the kernel is computed in float32 and returned in the model's dtype: 2 bytes an
    # entry come back, and for a moment the float32 kernel and its copy both exist
    model = _mlp(dtype)
    x = torch.randn(300, 6, dtype=dtype)
    plan = lazykernel.plan(model, x, output="diagonal")
    entries = 300 * 300 * 3
    result = {}
    peak = _peak_allocated_bytes(lambda: result.update(k=lazykernel.ntk(model, x, output="diagonal")))
    kernel = result["k"]
    assert kernel.dtype == dtype and kernel.shape == plan.shape == (300, 300, 3)
    assert plan.result_bytes == kernel.numel() * kernel.element_size() == entries * 2
    assert peak >= entries * (4 + 2)
    assert peak <= plan.peak_bytes
    reference = reference_ntk(model, x[:20], output="diagonal")
    torch.testing.assert_close(kernel[:20, :20].double(), reference, rtol=0.0, atol=3e-2 * reference.abs().max())


# -- FLOPs -------------------------------------------------------------------------------

@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
def test_plan_counts_the_jacobian_methods_blocks_as_whole_squares(output):
    # the Jacobian method's block is one product of the two chunks' Jacobians: a
    # symmetric kernel's diagonal block is computed whole, not as its upper triangle
    model = _mlp()
    x = torch.randn(24, 6)
    size = sum(p.numel() for p in model.parameters())
    m = 9 if output == "full" else 3
    plan = lazykernel.plan(model, x, output=output, method="jacobian")
    assert plan.chunks == (24, 24)
    assert plan.groups[0].flops == 2 * 24 * 24 * m * size
    assert plan.flops == pytest.approx(_counted_tile_flops(model, x, None, output, "jacobian"), rel=1e-6)
    assert_close_to_reference(lazykernel.ntk(model, x, output=output, method="jacobian"),
                              reference_ntk(model, x, output=output), torch.float32)


@pytest.mark.parametrize("n2, output, budget", [(0, "trace", None), (17, "full", None), (0, "diagonal", 2.5e6),
                                                (17, "trace", 2.5e6)])
def test_plan_counts_the_ntvp_methods_products_as_ntk_takes_them(n2, output, budget):
    # per block of r × c examples: O·r VJPs through the r examples of x1 and as
    # many JVPs through the c of x2, whatever the tiling
    model = _mlp()
    torch.manual_seed(1)
    x1 = torch.randn(20, 6)
    x2 = torch.randn(n2, 6) if n2 else None
    plan = lazykernel.plan(model, x1, x2, output=output, method="ntvp", memory_budget=budget)
    if budget is not None:
        assert plan.chunks[0] < 20
    counted = _counted_tile_flops(model, x1, x2, output, "ntvp", budget)
    assert plan.flops == pytest.approx(counted, rel=0.02)


def test_operand_flops_of_convolution_jacobians_are_counted_per_example():
    # torch.func forms the examples' weight gradients as one grouped convolution,
    # whose FLOPs PyTorch's counter multiplies by the number of groups: per example
    # the count grew with the number of probe examples it was measured on
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()).eval()
    outputs, products = 3 * 3 * 3, 2 * 3 * 2 * 3 * 3 * 3 * 3     # O = 27; one conv pass: 972 FLOPs
    for n in (1, 3, 8):
        plan = lazykernel.plan(model, torch.randn(n, 2, 5, 5), output="trace", method="jacobian")
        assert plan.chunks == (n, n)
        # the forward, and the weight gradient of each output (the bias's is a sum)
        assert plan.forward_flops == products
        assert plan.operand_flops == n * (1 + outputs) * products


# -- the default budget and how bytes are written ------------------------------------------

def test_default_cuda_budget_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    # after a call, PyTorch keeps its working memory cached: the device reports it as
    # used, yet this process can take it again; the next call must not get less
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    assert _memory.default_memory_budget(torch.device("cuda", 0)) == (10 + 28) * gib // 2


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1023.6, "1.0 KiB"), (1536, "1.5 KiB"), (1048575, "1.0 MiB"),
    ((1 << 30) - 1, "1.0 GiB"), (-2048, "-2.0 KiB"), (5 * (1 << 50), "5120.0 TiB"),
    (float("nan"), "nan B"), (float("inf"), "inf B"),
])
def test_format_bytes_takes_the_unit_of_the_rounded_value(n, text):
    assert _memory.format_bytes(n) == text


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_default_budget_takes_the_tightest_readable_cgroup_limit(tmp_path, monkeypatch):
    # the process's own cgroup says "max", its parent sets the limit (without usage or
    # statistics files), the root holds a value beyond int64 and a v1 file holds no number
    monkeypatch.setattr(_memory, "_PROC_CGROUP", str(tmp_path / "proc_cgroup"))
    monkeypatch.setattr(_memory, "_CGROUP_ROOT", str(tmp_path / "cgroup"))
    monkeypatch.setattr(_memory, "_meminfo_available_bytes", lambda: 8 << 30)
    _write(tmp_path / "proc_cgroup", "3:memory:/job\n0::/outer/inner\n")
    root = tmp_path / "cgroup"
    _write(root / "outer" / "inner" / "memory.max", "max\n")
    _write(root / "outer" / "inner" / "memory.current", "4096\n")
    _write(root / "outer" / "memory.max", "1073741824\n")
    _write(root / "memory.max", "18446744073709551615\n")
    _write(root / "memory" / "job" / "memory.limit_in_bytes", "not a number\n")
    assert _memory.default_memory_budget(torch.device("cpu")) == (1 << 30) // 4


class _RecordingLibc:
    def __init__(self, result):
        self.calls, self.result = [], result

    def madvise(self, start, length, advice):
        self.calls.append((start, length, advice))
        return self.result


def test_huge_page_advice_covers_whole_huge_pages_inside_the_buffer_only(monkeypatch):
    huge = 2 << 20
    libc = _RecordingLibc(0)
    monkeypatch.setattr(_memory, "_libc", libc)
    monkeypatch.setattr(_memory, "_madvise_works", True)
    elements = (33 << 20) // 4 + 7                  # 33 MiB and 28 bytes: no multiple of a page
    buffer = _memory.empty_buffer((elements,), torch.float32, torch.device("cpu"))
    assert buffer.shape == (elements,) and buffer.dtype == torch.float32
    [(start, length, advice)] = libc.calls
    assert advice == 14 and start % huge == 0 and length % huge == 0 and length >= 15 * huge
    assert buffer.data_ptr() <= start and start + length <= buffer.data_ptr() + elements * 4
    # small buffers are not advised; a kernel that refuses the advice is not asked again
    _memory.empty_buffer((1000, 3), torch.float64, torch.device("cpu"))
    assert len(libc.calls) == 1
    refusing = _RecordingLibc(-1)
    monkeypatch.setattr(_memory, "_libc", refusing)
    _memory.empty_buffer((40 << 20,), torch.uint8, torch.device("cpu"))
    _memory.empty_buffer((40 << 20,), torch.uint8, torch.device("cpu"))
    assert len(refusing.calls) == 1 and _memory._madvise_works is False
