"""`lazykernel.ntk`: the empirical Neural Tangent Kernel of a PyTorch model."""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

from lazykernel import _memory
from lazykernel._chain import exact_by_construction
from lazykernel._inputs import matching_layouts, pack_inputs
from lazykernel._jacobian import ntk_block_by_ntvp, per_example_jacobian
from lazykernel._precision import check_precision, gemm_gram_accumulate, matmul_precision, uses_tf32
from lazykernel._model import (ModelAdapter, ParamSelection, check_eval_mode, check_finite,
                               explained_autograd_errors, make_adapter, model_tensors, one_call_per_model,
                               parameters_device_and_dtype)
from lazykernel._structured import StructuredPlan, jacobian_loop, ntvp_agrees, term_cost
from lazykernel.rules import RuleDoesNotApply, explicit_attention
from lazykernel.ops import OUTPUTS, TOKEN_BATCH_ELEMENTS, gram_hadamard_accumulate, token_gram_accumulate

METHODS = ("auto", "structured", "jacobian", "ntvp")
_PROBE_EXAMPLES = 3


@one_call_per_model
def ntk(
    model,
    x1: torch.Tensor,
    x2: Optional[torch.Tensor] = None,
    *,
    output: str = "trace",
    method: str = "auto",
    params: ParamSelection = None,
    batch_size: Optional[int] = None,
    memory_budget: Optional[float] = None,
    progress: bool = False,
    precision: str = "highest",
) -> torch.Tensor:
    """Empirical Neural Tangent Kernel ``Θ(x1, x2) = J(x1) J(x2)ᵀ``.

    ``J(x) = ∂f(x; θ)/∂θ ∈ R^{O×P}`` is the Jacobian of one example's outputs
    (flattened to O) with respect to the selected parameters θ (Jacot, Gabriel &
    Hongler, 2018, "Neural Tangent Kernel: Convergence and Generalization in
    Neural Networks"). Examples must be independent: a model in training mode
    with BatchNorm or active Dropout is refused, and so is one whose output for
    an example changes with the rest of the batch (a few examples are also run
    one by one).

    Args:
        model: an ``nn.Module`` applied as ``model(x)``, or a torch.func-style
            ``fn(params, x)``; then ``params`` is required and is the dict of all
            its tensors (every floating-point entry is differentiated: buffers
            such as BatchNorm statistics belong in ``fn`` itself, e.g.
            ``lambda p, x: functional_call(model, {**p, **buffers}, (x,))``).
        x1: ``[N1, *in]`` inputs (floating point in the model's dtype, or integer
            token ids). For a model of several inputs, a tuple or list of such
            tensors, passed as ``model(*x1)`` (a functional ``fn(params, x1)``
            receives the tuple), or a dict with string keys, passed as
            ``model(**x1)``; every part holds the N1 examples along its first
            axis. Inputs given in parts are constants: no derivative flows to them.
        x2: ``[N2, *in]`` inputs, with the same parts as ``x1``; ``None`` means
            ``x1`` (and half the work); so does an ``x2`` holding exactly ``x1``'s values.
        output: ``"trace"`` → ``[N1, N2]``, ``Σ_o Θ_oo`` (a sum, not a mean);
            ``"diagonal"`` → ``[N1, N2, O]``, ``Θ_oo``; ``"full"`` →
            ``[N1, N2, O, O]``. With O = 1 every mode gives ``[N1, N2]``.
        method: ``"structured"``: per-layer rules (Novak, Sohl-Dickstein &
            Schoenholz, 2022, "Fast Finite Width Neural Tangent Kernel"):
            ``(A Aᵀ) ∘ (G Gᵀ)`` for linear maps, per-example gradients for the
            rest; ``"jacobian"``: explicit per-example Jacobian contraction;
            ``"ntvp"``: NTK-vector products (one VJP and one JVP per row);
            ``"auto"``: the structured method with each layer's term in the
            form (pairwise positions, per-example gradients, sparse token rows)
            that the cost model of :func:`lazykernel.plan` finds cheapest, and
            the Jacobian contraction for parameters without a rule. (For a
            layer with a rule, the contraction is never cheaper than the
            per-example-gradient form, which is the same Gram built from the
            captured operands without the extra backward passes.)
        params: for an ``nn.Module``: ``None`` (all parameters with
            ``requires_grad=True``), a list of names from
            ``model.named_parameters()``, or a predicate ``(name, param) -> bool``.
            Parameters with ``requires_grad=False`` never count.
        batch_size: at most this many examples per chunk.
        memory_budget: bytes of working memory (the returned kernel is not
            counted); default a quarter of the memory available on the CPU
            (within a container's limit), half of the free memory of a CUDA device.
            It covers the whole call, the check of the method on a few examples
            included; ``float('inf')``, or a number too large for a float, means
            no limit.
        progress: show a progress bar over chunk pairs (tqdm if installed).
        precision: ``"highest"``: every product in the inputs' dtype (on CUDA
            this turns off cuDNN's default TF32 convolutions for the call);
            ``"tf32"``: on CUDA, float32 matrix products and convolutions take
            TF32 tensor cores for this call (inputs rounded to 10 mantissa
            bits, float32 accumulation; see ``lazykernel._precision``). On the
            CPU and in float64 both compute the same.

    Returns:
        The kernel, on the model's device, in the model's dtype.

    Raises:
        ValueError: bad arguments: unknown ``output``/``method``, inputs the model
            rejects, mismatched trailing shapes, devices or dtypes, no trainable
            parameters, training-mode BatchNorm/Dropout, NaN or Inf, or a
            ``memory_budget`` too small for one example, or for the check of
            the method on a few examples that comes first.
    """
    with explained_autograd_errors():
        return _ntk(model, x1, x2, output, method, params, batch_size, memory_budget, progress, precision)


def _ntk(model, x1, x2, output, method, params, batch_size, memory_budget, progress, precision) -> torch.Tensor:
    # warnings point at the caller's line: past this function, ntk and the lock's wrapper
    setup = _setup(model, x1, x2, output, method, params, batch_size, memory_budget, precision)
    try:
        kernel = _compute(setup, setup.x1, batch_size, progress)
    except RuleDoesNotApply as error:
        # A layer saw the batch otherwise than the examples its rule was checked
        # on (a model that routes examples): the rules do not describe it.
        warnings.warn(f"{error}; on these examples the model does not use that layer as on the "
                      "examples its rule was checked on (does it route examples?), so the kernel "
                      "is computed with method='jacobian'", stacklevel=4)
        setup = _setup(model, x1, x2, output, "jacobian", params, batch_size, memory_budget, precision)
        kernel = _compute(setup, setup.x1, batch_size, progress)
    finite = not kernel.numel() or _looks_finite(kernel, setup.symmetric)
    if not finite:
        warnings.warn(not_finite_message(setup.dtype), stacklevel=4)
    if setup.dtype != setup.compute_dtype:
        wide, kernel = kernel, kernel.to(setup.dtype)
        # a finite kernel in its compute dtype that is not in the model's overflowed in the cast
        if finite and kernel.numel() and not _looks_finite(kernel, setup.symmetric):
            largest, limit = float(wide.abs().max()), torch.finfo(setup.dtype).max
            warnings.warn(f"the kernel, computed in {setup.compute_dtype}, has entries up to {largest:.3g}, beyond "
                          f"the range of the model's {setup.dtype} (at most {limit:.3g}): they are Inf in the "
                          f"result. For a {setup.compute_dtype} kernel, call ntk on model.float() with float "
                          "inputs.", stacklevel=4)
    return kernel


def not_finite_message(dtype: torch.dtype, where: str = "") -> str:
    """The warning for a kernel (``where``: the part of it) that holds NaN or Inf from finite
    inputs and parameters, with what to try: a wider dtype where there is one."""
    advice = "try smaller weights or inputs"
    if dtype != torch.float64:
        advice = "try float64, or smaller weights or inputs"
    return (f"the kernel holds NaN or Inf values although the inputs and parameters are finite{where}: the "
            f"model's outputs or their derivatives overflow in {dtype} on some examples ({advice})")


def _looks_finite(kernel: torch.Tensor, symmetric: bool) -> bool:
    """Is the kernel free of NaN and Inf, read cheaply?

    A symmetric kernel is finite where its diagonal is: |Θ_ij| ≤ √(Θ_ii Θ_jj), and
    an example whose Jacobian is not finite spoils its own Θ_ii. Otherwise one sum
    decides the common case. (A full element-wise test took a third as long as
    computing a full kernel at width 256.)
    """
    if symmetric:
        return bool(torch.isfinite(kernel.diagonal(dim1=0, dim2=1)).all())
    return bool(torch.isfinite(kernel.sum())) or bool(torch.isfinite(kernel).all())


def _compute(setup: "_Call", x1: torch.Tensor, batch_size: Optional[int], progress: bool) -> torch.Tensor:
    """The kernel of a set-up call, in its compute dtype (float32 for a float16 or
    bfloat16 model; `_ntk` casts it to the model's dtype)."""
    result = torch.zeros(setup.shape, dtype=setup.compute_dtype, device=setup.device)
    if setup.engine is not None:
        with setup.running():
            _run_tiles(setup.engine, x1, setup.x2, setup.symmetric, result, setup.mode, setup.budget,
                       setup.elt, batch_size, progress)
    return result


@dataclass
class _Call:
    """A validated call: the model, the inputs, what the result will be and, once
    `_setup` made it, the engine that computes it. Every way of computing the
    kernel (`ntk`, `plan`, `ntk_to_disk`) starts from one. ``x1`` and ``x2`` are
    the inputs as the engines take them: a model's several inputs packed into
    one tensor (`lazykernel._inputs`)."""

    adapter: ModelAdapter
    x1: torch.Tensor
    x2: torch.Tensor
    symmetric: bool
    n1: int
    n2: int
    mode: str
    outputs: int
    activations: int
    dtype: torch.dtype
    compute_dtype: torch.dtype
    elt: int
    device: torch.device
    budget: float
    precision: str = "highest"
    engine: Optional["_Engine"] = None  # set by `_setup`; None while unset or for an empty kernel

    @property
    def shape(self) -> Tuple[int, ...]:
        return _result_shape(self.n1, self.n2, self.outputs, self.mode)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """What the kernel's tiles are computed under: explicit attention, and the call's precision."""
        with explicit_attention(self.adapter.module), \
                matmul_precision(self.precision, self.device, self.compute_dtype):
            yield


def _prepare(model, x1, x2, output, method, params, batch_size, memory_budget,
             precision: str = "highest") -> _Call:
    """Check every argument of `ntk` and run the model once on a few examples of each input."""
    check_precision(precision)
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; expected one of {OUTPUTS}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    adapter = make_adapter(model, params)
    if adapter.module is not None:
        check_eval_mode(adapter.module)
    dtype, device, x1, x2 = _check_inputs(adapter, x1, x2)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    budget = _budget_bytes(memory_budget, device)

    symmetric = x2 is None or _same_examples(x1, x2)
    x2_ = x1 if symmetric else x2
    outputs, activations = _probe(adapter, x1, "x1")
    if not symmetric:
        _probe(adapter, x2_, "x2")
    mode = "trace" if outputs == 1 else output
    compute_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    elt = torch.empty((), dtype=compute_dtype).element_size()
    return _Call(adapter, x1, x2_, symmetric, x1.shape[0], x2_.shape[0], mode, outputs, activations,
                 dtype, compute_dtype, elt, device, budget, precision)


def _setup(model, x1, x2, output: str, method: str, params: ParamSelection,
           batch_size: Optional[int], memory_budget: Optional[float], precision: str = "highest") -> _Call:
    """`_prepare`, and the engine of the call (its rules checked on the probe examples)."""
    call = _prepare(model, x1, x2, output, method, params, batch_size, memory_budget, precision)
    if call.n1 and call.n2:
        with explicit_attention(call.adapter.module):
            probe = _check_examples(call.x1.detach(), None if call.symmetric else call.x2.detach())
            call.engine = _make_engine(method, call.adapter, probe, call.mode, call.outputs, call.activations,
                                       call.n1, call.n2, call.budget, call.elt)
        call.engine.default_budget = memory_budget is None
        call.engine.gemm_grams = uses_tf32(precision, call.device, call.compute_dtype)
    return call


def _budget_bytes(memory_budget, device: torch.device) -> float:
    """``memory_budget`` checked, in bytes: the default of ``device`` for None
    (`_memory.default_memory_budget`), and no limit for a number too large for a
    float, as for ``float('inf')``."""
    if memory_budget is None:
        return float(_memory.default_memory_budget(device))
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Real) \
            or not memory_budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    try:
        return float(memory_budget)
    except OverflowError:
        # an integer (or fraction) beyond float's range, 1.8e308 bytes: no memory is that large
        return math.inf


def _budget_advice(needed: float, budget: float, default: bool, device: torch.device) -> str:
    """What to do about a budget of ``budget`` bytes, below the ``needed``: raise it, or,
    where it is the default (``default``), free memory or pass one."""
    least = int(needed) + 1
    if not default:
        return f"Raise memory_budget to at least {least} bytes."
    if device.type == "cuda":
        share = 2 * _memory.DEFAULT_FRACTION
        source = (f"half of the {_memory.format_bytes(budget / share)} free on {device} (with what PyTorch's "
                  "caching allocator holds unused)")
    else:
        share = _memory.DEFAULT_FRACTION
        source = (f"a quarter of the {_memory.format_bytes(budget / share)} of memory available to this "
                  "process (within its memory cgroup, a container's limit)")
    return (f"memory_budget was not given, and its default is {source}. Free memory and call again, or "
            f"pass memory_budget explicitly (at least {least} bytes) if that memory is there to use.")


# -- validation ------------------------------------------------------------------

def _check_inputs(adapter: ModelAdapter, x1, x2) -> Tuple[torch.dtype, torch.device, torch.Tensor,
                                                          Optional[torch.Tensor]]:
    """The parameters' dtype and device, and the inputs checked: several inputs of a model
    (a tuple, list or dict) each checked, then packed into one tensor, whose layout the
    adapter then holds (`lazykernel._inputs`)."""
    for name, p in adapter.params.items():
        _refuse_transformed(f"parameter {name!r}", p)

    def check_part(part: torch.Tensor, label: str) -> None:
        _refuse_transformed(label, part)
        device, dtype = parameters_device_and_dtype(adapter)
        _check_input(label, part, device, dtype)

    packed = {}
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None and name == "x2":
            packed[name] = (None, None)
            continue
        x, layout = pack_inputs(x, name, check_part, collapse=adapter.module is not None)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [N, *in] (or, for a model of several "
                             f"inputs, a tuple or dict of them), got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have a batch dimension first, [N, *in]; got a scalar")
        packed[name] = (x, layout)
    (x1, layout1), (x2, layout2) = packed["x1"], packed["x2"]
    if x2 is not None:
        matching_layouts(layout1, layout2)
    adapter.layout = layout1
    if x2 is not None and tuple(x1.shape[1:]) != tuple(x2.shape[1:]):
        raise ValueError(
            f"x1 and x2 must have the same trailing shape (one example's shape): "
            f"x1 is {tuple(x1.shape)}, x2 is {tuple(x2.shape)}"
        )
    device, dtype = parameters_device_and_dtype(adapter)
    if layout1 is None:
        for name, x in (("x1", x1), ("x2", x2)):
            if x is not None:
                _refuse_transformed(name, x)
                _check_input(name, x, device, dtype)
    for name, tensor in model_tensors(adapter).items():
        check_finite(f"parameter {name!r}" if name in adapter.params else f"model tensor {name!r}", tensor)
    return dtype, device, x1, x2


def _refuse_transformed(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor of an enclosing ``torch.func`` transform or a forward-mode dual:
    the kernel holds its inputs and parameters constant, so a derivative through it
    would be zero without a word (and vmap fails deep inside)."""
    if is_functorch_wrapped_tensor(t) or forward_ad.unpack_dual(t).tangent is not None:
        raise ValueError(
            f"{name} is a tensor of an enclosing torch.func transform (grad, jacrev, jvp or vmap) or a "
            "forward-mode dual: ntk computes the kernel at the current inputs and parameters, holds them "
            "constant (a derivative through it would be zero) and maps over the examples itself. Call it "
            "outside the transform on all the examples at once; for a derivative of the kernel, form "
            "J(x1) J(x2)ᵀ from torch.func.jacrev inside the transform")


def _check_input(name: str, x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    """An input (or one part of a model's inputs) on the parameters' device, in its dtype if
    floating point, and finite."""
    if x.device != device:
        raise ValueError(f"{name} is on device {x.device} but the model's parameters are on "
                         f"{device}; move them to the same device (e.g. {name}.to({str(device)!r}))")
    if x.is_floating_point() and x.dtype != dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but the model's parameters have dtype {dtype}; "
                         f"convert one of them (e.g. {name}.to({dtype}))")
    check_finite(name, x)


def _seeds_itself(adapter: ModelAdapter, sample: torch.Tensor, dtype: torch.dtype,
                  after: Tuple[torch.Tensor, ...]) -> bool:
    """Are a forward's draws independent of the generators' state before it (it seeds
    them itself, so it draws the same numbers every time)? Run again from another
    state, it then leaves them as it did the first time (``after``), which it does not
    if it drew from the state it was given. The caller's generators are left at ``after``.
    """
    torch.set_rng_state(torch.Generator().manual_seed(0x5EED).get_state())
    if sample.device.type == "cuda":
        with torch.cuda.device(sample.device):
            torch.cuda.manual_seed(0x5EED)
    try:
        with torch.no_grad(), matmul_precision("highest", sample.device, dtype), \
                explicit_attention(adapter.module):
            adapter.forward(sample)
        again = _random_state(sample.device)
    except Exception:
        return False
    finally:
        torch.set_rng_state(after[0])
        if sample.device.type == "cuda":
            torch.cuda.set_rng_state(after[1], sample.device)
    return all(torch.equal(first, second) for first, second in zip(after, again))


def _random_state(device: torch.device) -> Tuple[torch.Tensor, ...]:
    """The states of the random number generators a forward on ``device`` may draw from."""
    states = (torch.get_rng_state(),)
    if device.type == "cuda":
        states += (torch.cuda.get_rng_state(device),)
    return states


def _same_examples(x1: torch.Tensor, x2: torch.Tensor) -> bool:
    """Does ``x2`` hold exactly ``x1``'s examples (the same tensor, or the same bits)?

    Then ``Θ(x1, x2)`` is symmetric and computed as for ``x2=None``: each example's
    operands are formed once and only the upper triangle of example pairs is
    computed, half the work of two independent sides. The comparison reads the
    inputs once, which is small beside a kernel over them.
    """
    if x2 is x1:
        return True
    if x1.shape != x2.shape or x1.dtype != x2.dtype or x1.device != x2.device:
        return False
    if x1.is_floating_point():
        # bit patterns, so that -0.0 and 0.0 stay different examples
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x1.element_size()]
        x1, x2 = x1.view(bits), x2.view(bits)
    return bool(torch.equal(x1, x2))


def _probe(adapter: ModelAdapter, x: torch.Tensor, name: str, needs_outputs: bool = True) -> Tuple[int, int]:
    """Run the model on a few examples: does it accept ``x``, and how big is it?

    Returns (O, activation elements per example). A model with no outputs per
    example is refused when ``needs_outputs`` (a kernel between its outputs).
    """
    k = min(x.shape[0], _PROBE_EXAMPLES)
    # A copy, so a model that writes into its input does not write into the
    # caller's; made outside inference mode, so that its writes are counted; and
    # seen through a view, as the chunks of x will be.
    with torch.inference_mode(False):
        copy = x[:k].clone() if k else x[:1].new_zeros((1,) + tuple(x.shape[1:]))
    sample = copy[:]
    k = sample.shape[0]
    version = _version_of(sample)
    hint = (f"; {name} must be [N, *in], examples along its first axis: one example of shape "
            f"{tuple(x.shape)} is {name}.unsqueeze(0)") if x.dim() == 1 else ""
    seen = [int(sample.numel())]
    peaks: list = []
    handles = []

    def count(out):
        if isinstance(out, torch.Tensor):
            seen.append(out.numel())
            if out.is_floating_point() and out.numel():
                # read after the forward: a float() here would break a compiled model's graph
                peaks.append(out.detach().abs().max())

    if adapter.module is not None:
        handles = [m.register_forward_hook(lambda module, args, out: count(out))
                   for m in adapter.module.modules() if not list(m.children())]
        counting = contextlib.nullcontext()
    else:
        # a functional model has no layers to hook: count what its operations allocate
        counting = _CountAllocations(count)
    # TF32 off, so that the examples run alone round as they do together (`_check_independent`)
    dtype = next(iter(adapter.params.values())).dtype
    precise = matmul_precision("highest", sample.device, dtype)
    random_state = _random_state(sample.device)
    try:
        # without the fused inference path of transformer layers, which under no_grad
        # turns padded batches into nested tensors and computes them otherwise
        with torch.no_grad(), precise, counting, explicit_attention(adapter.module):
            y = adapter.forward(sample)
    except Exception as error:
        layout = adapter.layout
        given = f"{name} of shape {tuple(x.shape)}" if layout is None else (
            f"{name}, {x.shape[0]} examples of {layout.describe()} passed as "
            f"{'model(**' if layout.keyword else 'model(*'}{name})")
        raise ValueError(
            f"the model could not be applied to {given} "
            f"(tried its first {k} example(s)): {type(error).__name__}: {error}{hint}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    if version is not None and _version_of(sample) != version:
        raise ValueError(
            f"the model changed its input in place (on the first examples of {name}), for example with an "
            "activation built with inplace=True applied to the input itself: every evaluation lazykernel "
            f"makes would then see altered inputs and {name} itself would be overwritten. Make that "
            "operation out-of-place (inplace=False), or clone the input at the start of forward."
        )
    after = _random_state(sample.device)
    if not all(torch.equal(before, now) for before, now in zip(random_state, after)) \
            and not _seeds_itself(adapter, sample, dtype, after):
        raise ValueError(
            f"the model draws random numbers in its forward (on the first examples of {name}): dropout "
            "called with training=True (F.dropout(x, p, training=True) ignores model.eval()), noise from "
            "torch.randn, or sampling. Its outputs then change from one evaluation to the next and the "
            "NTK is not defined; make the forward deterministic in eval mode (e.g. "
            "F.dropout(x, p, training=self.training))")
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"the model must return a tensor, got {type(y).__name__}")
    if y.is_complex():
        raise ValueError(
            f"the model returns complex outputs ({y.dtype}, on the first examples of {name}); the NTK here "
            "is that of real outputs: return torch.view_as_real(y) (the real and imaginary parts as two "
            "outputs each)")
    if y.dim() == 0 or y.shape[0] != k:
        raise ValueError(
            f"the model's output must have the batch dimension first: for {k} example(s) of {name} "
            f"it returned shape {tuple(y.shape)}{hint}"
        )
    if not y.is_floating_point():
        raise ValueError(
            f"the model returns {y.dtype} outputs (on the first examples of {name}), which have no derivative "
            "in the parameters; return the floating-point values before any argmax, rounding or cast"
        )
    if needs_outputs and y[0].numel() == 0:
        raise ValueError(
            f"the model returns no outputs per example (shape {tuple(y.shape)} for {k} example(s) of "
            f"{name}), so its tangent kernel has no entries; check the size of its last layer"
        )
    if not exact_by_construction(adapter.module, sample):
        with explicit_attention(adapter.module):
            _check_independent(adapter, sample, y, name, dtype, max((float(p) for p in peaks), default=0.0))
    return max(1, y[0].numel()), sum(seen) // k


class _CountAllocations(TorchFunctionMode):
    """Hands each new tensor a torch function returns to ``count``: not views of
    other tensors, nor in-place results (the tensor passed in), which take no memory."""

    def __init__(self, count):
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {id(a) for a in args if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t._base is None and id(t) not in given:
                self.count(t)
        return out


# Batch and single-example outputs further apart than this share of the largest
# output refuse the model; closer but beyond round-off, a warning (a model whose
# outputs are small differences of large terms rounds differently by batch size).
_COUPLED = 0.05


def _check_independent(adapter: ModelAdapter, sample: torch.Tensor, y: torch.Tensor, name: str,
                       dtype: torch.dtype, inside: float = 0.0) -> None:
    """Refuse a model whose output for one example depends on the others in the batch.

    Each example of ``sample`` is run alone and compared with its row of ``y``
    (the batch's outputs, computed in the parameters' ``dtype`` with TF32 off, as
    these are), relative to the largest of the outputs and of the
    values ``inside`` the model (its layers' outputs), whose round-off an
    output that is a difference of large terms inherits. A model that fails
    on a single example, returns another shape for it or non-finite outputs
    is left to the methods.
    """
    if sample.shape[0] < 2 or not y.is_floating_point() or not bool(torch.isfinite(y).all()):
        return
    scale = max(float(y.detach().abs().max()), inside if math.isfinite(inside) else 0.0, 1e-30)
    round_off = 1e-8 if y.dtype == torch.float64 else 1e-3
    worst, worst_at = 0.0, 0
    for i in range(sample.shape[0]):
        try:
            with torch.no_grad(), matmul_precision("highest", sample.device, dtype):
                alone = adapter.forward(sample[i:i + 1].clone())
        except Exception:
            return
        if not isinstance(alone, torch.Tensor) or alone.shape != (1,) + tuple(y.shape[1:]):
            return
        difference = float((alone[0] - y[i]).abs().max())
        if not difference <= worst:
            worst, worst_at = difference, i
    if worst <= round_off * scale:
        return
    where = (f"example {worst_at} of the first of {name} gives outputs {worst:.3g} apart alone and among "
             f"{sample.shape[0]} (largest value in the model {scale:.3g})")
    if worst > _COUPLED * scale:
        raise ValueError(
            f"the model's output for one example depends on the other examples of the batch: {where}. "
            "The per-example NTK is undefined for such a model (statistics over the batch axis: a mean or "
            "softmax over examples, BatchNorm in training mode; or randomness in forward); compute those "
            "statistics per example, or from fixed values.")
    warnings.warn(
        f"lazykernel: {where}: more than round-off usually gives. If the model mixes examples (statistics "
        "over the batch axis) its per-example NTK is undefined; if its outputs are small differences of "
        "large terms, this is round-off and the kernel is fine.", stacklevel=4)


def _version_of(x: torch.Tensor) -> Optional[int]:
    """How many in-place writes ``x`` has seen, or None for tensors that do not count them."""
    try:
        return x._version
    except RuntimeError:
        # inference-mode tensors keep no version counter
        return None


def _result_shape(n1: int, n2: int, outputs: int, mode: str) -> Tuple[int, ...]:
    if mode == "trace":
        return (n1, n2)
    if mode == "diagonal":
        return (n1, n2, outputs)
    return (n1, n2, outputs, outputs)


# -- the methods -----------------------------------------------------------------

class _Engine:
    """One method: per-chunk features, and the kernel block of two feature sets."""

    name = ""

    # share of the memory budget kept free beside the chunks' held features for
    # the temporaries of `block` (per-example gradient slabs)
    reserve = 0.0
    # single-position Grams by GEMMs on tensor cores (precision="tf32", `_precision`)
    gemm_grams = False
    # the examples the method was checked on before any chunk (`_check_examples`, `_make_engine`)
    probe: Optional[torch.Tensor] = None
    # whether the budget is the default one, a share of the memory available (`_memory.default_memory_budget`)
    default_budget = False

    def __init__(self, adapter: ModelAdapter, mode: str, dtype: torch.dtype, outputs: int,
                 activations: int, elt: int, budget: float):
        self.adapter, self.mode, self.dtype = adapter, mode, dtype
        self.outputs, self.activations, self.elt = outputs, activations, elt
        self.budget = budget

    def features(self, x: torch.Tensor):
        raise NotImplementedError

    def block(self, f1, f2, same: bool, out: torch.Tensor) -> None:
        """Write Θ of the two chunks into ``out`` (a zero-filled view of the result)."""
        raise NotImplementedError

    def bytes_per_example(self, other_chunk: int) -> float:
        """Peak bytes per example while a chunk's features are formed (and held)."""
        raise NotImplementedError

    def held_per_example(self) -> float:
        """Bytes per example of features that stay held through `block`, if `reserve` is kept beside them."""
        return 0.0

    def check_bytes(self) -> float:
        """Peak bytes of the check of the method on the `probe` examples, which `_make_engine`
        runs before any chunk: their passes, as in a chunk of that many examples."""
        k = self.probe.shape[0]
        return k * self.bytes_per_example(k) + self.probe_copies(k)

    def probe_copies(self, rows: int) -> float:
        """Bytes of ``rows`` probe examples held twice through the check: stacked, and the copy it
        differentiates."""
        return 2.0 * rows * self.probe[0].numel() * self.probe.element_size()

    def settle(self, rows: int) -> None:
        """Last checks once the largest chunk, ``rows`` examples, is known."""

    def pair_bytes(self) -> float:
        """Bytes per example pair that `block` needs beside the kernel block itself."""
        return 0.0


class _StructuredEngine(_Engine):
    name = "structured"

    def __init__(self, plan: StructuredPlan, probe: torch.Tensor, *args):
        super().__init__(plan.adapter, *args)
        self.plan = plan
        self.probe = probe
        self._forward_elements: Optional[float] = None
        # per-example gradient slabs and gathered embedding rows are formed in `block`
        if any(form in ("gradient", "tokens") for forms in plan.forms for form in (forms or [])):
            self.reserve = 0.25

    def features(self, x):
        a_list, g_list, tokens, deferred = self.plan.operands(x)
        cast = [t if t.dtype == self.dtype else t.to(self.dtype) for t in a_list + g_list]
        k = len(a_list)
        tokens = [(ex, ids, g.to(self.dtype)) for ex, ids, g in tokens]
        deferred = [(a.to(self.dtype), g.to(self.dtype)) for a, g in deferred]
        return cast[:k], cast[k:], tokens, deferred

    def block(self, f1, f2, same, out):
        a1, a2, g1, g2 = f1[0], f2[0], f1[1], f2[1]
        if self.gemm_grams:
            flat = [a.shape[1] == 1 for a in a1]
            gemm_gram_accumulate(out, *([t for t, one in zip(terms, flat) if one] for terms in (a1, a2, g1, g2)),
                                 self.mode)
            a1, a2, g1, g2 = ([t for t, one in zip(terms, flat) if not one] for terms in (a1, a2, g1, g2))
        if a1:
            gram_hadamard_accumulate(out, a1, a2, g1, g2, self.mode, symmetric=same)
        held = _features_bytes(f1) + (0 if same else _features_bytes(f2)) + out.numel() * self.elt
        for rows1, rows2 in zip(f1[2], f2[2]):
            token_gram_accumulate(out, rows1, rows2, self.mode, max_pairs_elements=self.token_batch(held))
        if f1[3]:
            spare = self.slab_space(held)
            slabs = [self._slab_features(term1, term2, same, spare) for term1, term2 in zip(f1[3], f2[3])]
            # one buffer, sized for the largest slab, serves every slab of every term: a
            # fresh allocation of that size would be paged in anew each time. It is
            # freed with the block, as the next chunk's operands will need the room.
            a = f1[3][0][0]
            space = _memory.empty_buffer((max(size for _, size in slabs),), a.dtype, a.device)
            for term1, term2, (slab, _) in zip(f1[3], f2[3], slabs):
                _gradient_block(term1, term2, same, out, self.mode, slab, space)

    def pair_bytes(self) -> float:
        # the inputs' Gram and the cotangents' Gram of `gemm_gram_accumulate`
        return 2.0 * self.elt if self.gemm_grams else 0.0

    def slab_space(self, held: float) -> float:
        """Bytes for per-example gradient slabs beside ``held`` bytes of operands and kernel
        block: what the budget leaves, and at least the `reserve` chunk planning kept."""
        return max(self.budget - held, self.budget * self.reserve)

    def token_batch(self, held: float) -> int:
        """``max_pairs_elements`` of `token_gram_accumulate` beside ``held`` bytes: its
        batches hold three tensors of that many elements (both sides' gathered rows
        and their product), within what the budget leaves and at most its default."""
        # (compared before the conversion: an unlimited budget leaves infinite space)
        return max(1, int(min(TOKEN_BATCH_ELEMENTS, self.slab_space(held) // (3 * self.elt))))

    def _slab_features(self, term1, term2, same: bool, spare: float) -> Tuple[int, int]:
        """(D', elements): output features per slab of a term's per-example gradients, and the
        elements one slab takes; a slab of D' features is ``(n1+n2)·O·D'·K`` elements and
        must fit in ``spare`` bytes."""
        (a1, g1), (a2, _) = term1, term2
        rows = a1.shape[0] + (0 if same else a2.shape[0])
        return self.slab(rows, g1.shape[0], g1.shape[3], a1.shape[2], spare)

    def slab(self, rows: int, o: int, d: int, k: int, spare: float) -> Tuple[int, int]:
        """`_slab_features` for ``rows`` examples of a term with O outputs, D output
        features and K input features (`planning` sizes the slab buffer with it too)."""
        slab = int(max(1, min(d, spare // max(rows * o * k * self.elt, 1))))
        return slab, rows * o * slab * k

    def settle(self, rows):
        self.plan.check_taps_at(self.probe, rows)

    def bytes_per_example(self, other_chunk):
        return self._pass_bytes(self.chain_elements(other_chunk))

    def _pass_bytes(self, chain: float) -> float:
        """Bytes per example of a chunk's passes, where a layer chain's capture takes ``chain``
        elements per example (`chain_elements`)."""
        o = self.plan.outputs or 1
        # the operands, plus the larger of what forms them: the batched backward's
        # cotangent buffers and forward graph, a layer chain's capture, or the
        # cotangents copied into the operands' layout
        operands = self.plan.elements_per_example()
        # torch.func forms the generic group's Jacobian per use of a parameter and
        # sums them (a tied weight, what sends a parameter there, has two): one more
        # Jacobian than the operands hold while it is formed
        forming = o * self.plan.generic_size() if self.plan.generic else 0
        return self.elt * (operands + max(operands, (o + 2) * self.forward_elements(), chain) + forming)

    def forward_elements(self) -> float:
        """Elements per example of the tensors the model's forward creates: the larger of
        its layers' outputs (`_probe`) and of every tensor its operations return.

        The layers' outputs miss what a module's own ``forward`` computes between
        them with functions (``F.affine_grid`` and ``F.grid_sample``, say), which the
        backward keeps and differentiates too; a forward of the probe examples counts
        it (a functional model's count, `_probe`'s, is already that)."""
        if self._forward_elements is None:
            counted = 0.0
            # (a perceptron's layers' outputs are all its forward creates)
            if self.adapter.module is not None and not self.plan.exact:
                seen = [self.probe[0].numel() * self.probe.shape[0]]
                with torch.no_grad(), _CountAllocations(lambda t: seen.append(t.numel())), \
                        explicit_attention(self.adapter.module):
                    self.adapter.forward(self.probe)
                counted = sum(seen) / self.probe.shape[0]
            self._forward_elements = max(float(self.activations), counted)
        return self._forward_elements

    def chain_elements(self, other_chunk: int) -> float:
        """Elements per example of a layer chain's capture (`LayerChain.capture_elements`),
        with the patches the convolution rules that take its chunks gather; 0 without a chain.

        Its backward runs a chunk of examples at a time, and that chunk's temporaries are
        spread over ``other_chunk`` examples: the same chunk's in a symmetric kernel
        (square tiles), and in the sum of both sides' passes of another tile
        (`_tile_bytes`) at least once whichever side is larger.
        """
        chain = self.plan.chain
        if chain is None:
            return 0.0
        rows = max(1, int(min(other_chunk, sys.maxsize)))
        chunked = [rule for rule, forms in zip(self.plan.rules, self.plan.forms) if rule.takes_chunks(forms)]
        # each gathers its patches, with a row of ones for the bias (`_ConvRule.add_chunk`)
        gathered = sum((shape.k + 1) * shape.positions for rule in chunked for shape in rule.shapes)
        dtype = next(iter(self.adapter.params.values())).dtype
        return chain.capture_elements(self.plan.rules, chunked, rows, dtype, self.probe.device, gathered) / rows

    def held_per_example(self):
        return self.elt * self.plan.elements_per_example()

    def check_bytes(self):
        # `StructuredPlan.verify` checks a single example as two, and forms every rule's
        # operands in its first form for the one output Σ_o w_o f_o, from captured inputs
        # and cotangents about as large (a convolution's unfolded patches are its operands):
        # more than the chosen forms take where those are smaller (gradients of a convolution)
        rows = max(2, self.probe.shape[0])
        first = sum(term_cost(shape, shape.forms[0], 1, "trace")[2]
                    for rule in self.plan.rules for shape in rule.shapes)
        # (its captures take the cotangents with autograd, or a layer chain's of one
        # weighted output, which takes less than the forward's graph)
        per_example = max(self._pass_bytes(0.0), 2.0 * first * self.elt)
        along = 0.0
        if not self.plan.exact:
            # then the rules' gradients along a random direction (`_agrees_along_random_direction`),
            # beside those operands and the cotangents and inputs they came from: a forward's
            # graph and its backward for one weighted output, the direction (dense) and
            # autograd's gradients of two examples (the last one's still held while the next
            # is formed), these three parameter-sized (the rules' parameters, at most all)
            forward = self.forward_elements()
            along = rows * self.elt * (first + 4 * forward) + 3.0 * self.adapter.num_params * self.elt
        return max(rows * per_example, along) + self.probe_copies(rows)


def _gradient_block(term1, term2, same: bool, out: torch.Tensor, mode: str, slab: int,
                    space: torch.Tensor) -> None:
    """Add the Gram of per-example gradients ``Σ_t g_t a_tᵀ`` to ``out``, formed into
    ``space`` ``slab`` output features at a time."""
    (a1, g1), (a2, g2) = term1, term2
    n1, n2 = a1.shape[0], a2.shape[0]
    o, d, k = g1.shape[0], g1.shape[3], a1.shape[2]
    for start in range(0, d, slab):
        part = slice(start, min(d, start + slab))
        size = o * (part.stop - part.start) * k
        grad1 = _slab_gradient(a1, g1, part, space[:n1 * size])
        grad2 = grad1 if same else _slab_gradient(a2, g2, part, space[n1 * size:(n1 + n2) * size])
        _gradient_gram(out, grad1, grad2, mode)


def _slab_gradient(a: torch.Tensor, g: torch.Tensor, part: slice, space: torch.Tensor) -> torch.Tensor:
    """``[O, n, D'·K]``: per-example gradients ``Σ_t g_t a_tᵀ`` of the output features ``part``,
    written into ``space`` (``O·n·D'·K`` elements).

    One batched GEMM ``[D', T] × [T, K]`` per output, over the examples; the
    cotangent ``g: [O, n, T, D]`` is read in place, its slab by stride.
    """
    o, n, t, _ = g.shape
    width = part.stop - part.start
    grad = space.view(o, n, width, a.shape[2])
    for j in range(o):
        torch.bmm(g[j, :, :, part].transpose(1, 2), a, out=grad[j])      # [n, D', K]
    return grad.view(o, n, -1)


def _features_bytes(features) -> int:
    """Bytes of the tensors in a chunk's features (a tensor, or nested sequences of them)."""
    if isinstance(features, torch.Tensor):
        return features.numel() * features.element_size()
    return sum(_features_bytes(part) for part in features)


def _gradient_gram(out: torch.Tensor, grad1: torch.Tensor, grad2: torch.Tensor, mode: str) -> None:
    """Add the Gram of per-example gradients ``[O, n1, P]`` and ``[O, n2, P]`` to ``out``."""
    o, n1, _ = grad1.shape
    n2 = grad2.shape[1]
    if mode == "full":
        full = grad1.reshape(o * n1, -1) @ grad2.reshape(o * n2, -1).T          # [O·n1, O·n2]
        out += full.view(o, n1, o, n2).permute(1, 3, 0, 2)
        return
    if mode == "trace":
        for j in range(o):                       # no [O, n1, n2] temporary
            out.addmm_(grad1[j], grad2[j].T)
    else:
        out += torch.bmm(grad1, grad2.transpose(1, 2)).permute(1, 2, 0)     # [O, n1, n2]


class _JacobianEngine(_Engine):
    name = "jacobian"
    # how the per-example Jacobians are formed (`jacobian_loop`): torch.func's vmap, a loop
    # of jacrev over the examples, or one backward per example and output
    by_loop = False

    def features(self, x):
        # (detached: the kernel has no derivative in the inputs, and a graph through them would
        # hold every tile's Jacobians until the kernel is freed)
        return per_example_jacobian(self.adapter, list(self.adapter.params), x.detach(),
                                    by_loop=self.by_loop).to(self.dtype)

    def block(self, f1, f2, same, out):
        n1, o, p = f1.shape
        n2 = f2.shape[0]
        if self.mode == "trace":
            out.copy_(f1.reshape(n1, o * p) @ f2.reshape(n2, o * p).T)
        elif self.mode == "diagonal":
            out.copy_(torch.einsum("iop,jop->ijo", f1, f2))
        else:
            full = f1.reshape(n1 * o, p) @ f2.reshape(n2 * o, p).T
            out.copy_(full.reshape(n1, o, n2, o).permute(0, 2, 1, 3))

    def bytes_per_example(self, other_chunk):
        p = self.adapter.num_params
        return self.elt * (3 * self.outputs * p + (self.outputs + 2) * self.activations)


class _NtvpEngine(_Engine):
    name = "ntvp"
    # one plain VJP and JVP per row, where torch.func's vmap was found wrong (`ntvp_agrees`)
    by_loop = False

    def features(self, x):
        # detached, as the Jacobian method's inputs are
        return x.detach()

    def block(self, f1, f2, same, out):
        rows = ntk_block_by_ntvp(self.adapter, f1, f2, self.by_loop).to(self.dtype)  # [n1, O, n2, O]
        if self.mode == "trace":
            out.copy_(rows.diagonal(dim1=1, dim2=3).sum(-1))
        elif self.mode == "diagonal":
            out.copy_(rows.diagonal(dim1=1, dim2=3))
        else:
            out.copy_(rows.permute(0, 2, 1, 3))

    def bytes_per_example(self, other_chunk):
        # each of the O rows of an x1 example holds a parameter-sized tangent and a
        # JVP through the whole x2 chunk
        p = self.adapter.num_params
        return self.elt * self.outputs * (2 * p + 3 * other_chunk * self.activations)

    def check_bytes(self):
        k, p = self.probe.shape[0], self.adapter.num_params
        if self.adapter.forward_mode_agrees is False:
            # without forward mode the check is the jacobian method's, on per-example Jacobians
            per_example = self.elt * (3 * self.outputs * p + (self.outputs + 2) * self.activations)
            return k * per_example + self.probe_copies(k)
        # `ntvp_agrees`: two rows, each a tangent and a JVP through the probe examples, and
        # two parameter-sized tangents compared in float64
        rows = 2 * self.elt * (2 * p + 3 * k * self.activations)
        return rows + 2.0 * 8 * p + self.probe_copies(k)


def _check_examples(x1: torch.Tensor, x2: Optional[torch.Tensor]) -> torch.Tensor:
    """The examples every rule is checked on: up to `_PROBE_EXAMPLES` different ones, and
    the first of them again at the end where the batch is longer.

    A rule that reads another example's rows (a layer applied to a reordered
    or folded batch) shows only on different examples, and a chunk of x2 can
    hold several even when x1 has one; x2 often repeats x1's first rows. A
    layer that sees the batch in an order the examples decide (sorted by a
    key, as length bucketing does) shows only where that order is not the
    given one: x1's middle, first and last rows are taken, in that order, and
    keys ``a, b, c, a`` are sorted neither way unless they are all equal.
    The probe is never longer than the batch, which a model may rely on.
    """
    n = x1.shape[0]
    chosen = []
    for i in dict.fromkeys((n // 2, 0, n - 1)):
        # equal rows check nothing that one of them does not: a layer reading its
        # positions as its examples gives equal examples the same gradients either way
        if not any(torch.equal(x1[i], seen) for seen in chosen):
            chosen.append(x1[i])
    chosen = chosen[:_PROBE_EXAMPLES]
    if x2 is not None and len(chosen) < _PROBE_EXAMPLES:
        like = chosen[0].dtype if chosen else x2.dtype
        for row in x2[:2 * _PROBE_EXAMPLES].to(like):
            if len(chosen) == _PROBE_EXAMPLES:
                break
            if not any(torch.equal(row, seen) for seen in chosen):
                chosen.append(row)
    longest = max(n, x2.shape[0] if x2 is not None else 0)
    if 1 < len(chosen) < longest:
        chosen.append(chosen[0])
    return torch.stack(chosen)


def _make_engine(method, adapter, probe, mode, outputs, activations, n1, n2, budget, elt) -> _Engine:
    """The engine of ``method``; the structured one has its rules checked on ``probe`` (`_check_examples`)."""
    dtype = torch.float64 if elt == 8 else torch.float32
    common = (mode, dtype, outputs, activations, elt, budget)
    if method in ("auto", "structured"):
        plan = StructuredPlan.build(adapter)
        plan.verify(probe, rows=max(n1, n2))
        plan.choose_forms(n1, n2, mode, budget / elt)
        return _StructuredEngine(plan, probe, *common)
    if method == "jacobian":
        engine = _JacobianEngine(adapter, *common)
        engine.by_loop = jacobian_loop(adapter, list(adapter.params), probe)
    else:
        engine = _NtvpEngine(adapter, *common)
        engine.by_loop = not ntvp_agrees(adapter, probe)
    engine.probe = probe
    return engine


# -- tiling ----------------------------------------------------------------------

def _tile_bytes(engine: _Engine, b1: int, b2: int, cell_bytes: float) -> float:
    """Working memory of one tile: both chunks' features and passes, or their held
    features with the `reserve` beside them, whichever is larger; and the kernel block."""
    passes = b1 * engine.bytes_per_example(b2) + b2 * engine.bytes_per_example(b1)
    held = (b1 + b2) * engine.held_per_example() / (1.0 - engine.reserve)
    return max(passes, held) + b1 * b2 * (cell_bytes + engine.pair_bytes())


def _working_bytes(engine: _Engine, n1: int, b1: int, b2: int, symmetric: bool, cell_bytes: float) -> float:
    """Working memory of the largest tile; a symmetric kernel in one chunk holds one set of operands."""
    if symmetric and b1 >= n1:
        # one chunk's features, formed once, paired with themselves (the NTK-vector products'
        # JVPs run through that chunk), plus the whole kernel
        passes = n1 * engine.bytes_per_example(n1)
        held = n1 * engine.held_per_example() / (1.0 - engine.reserve)
        return max(passes, held) + n1 * n1 * (cell_bytes + engine.pair_bytes())
    return _tile_bytes(engine, b1, b2, cell_bytes)


def _plan_chunks(engine: _Engine, n1: int, n2: int, cell_bytes: float, budget: float,
                 batch_size: Optional[int], symmetric: bool = False) -> Tuple[int, int]:
    """Chunk sizes (b1, b2) whose features and kernel block fit in ``budget``."""

    def cost(b1: int, b2: int) -> float:
        return _tile_bytes(engine, b1, b2, cell_bytes)

    _check_least_budget(engine, n1, symmetric, cell_bytes, budget)
    if symmetric and (batch_size is None or batch_size >= n1) \
            and _working_bytes(engine, n1, n1, n1, True, cell_bytes) <= budget:
        # one chunk: its operands serve as both sides of the only block
        return n1, n1
    cap = batch_size or max(n1, n2)
    b1, b2 = min(n1, cap), min(n2, cap)
    while cost(b1, b2) > budget:
        if b1 >= b2 and b1 > 1:
            b1 = (b1 + 1) // 2
        else:
            b2 = (b2 + 1) // 2
    return b1, b2


def _check_least_budget(engine: _Engine, n1: int, symmetric: bool, cell_bytes: float, budget: float) -> None:
    """Refuse a budget below the least the call takes: one tile of a single example on each
    side (a lone example's symmetric kernel holds its operands once), and the check of
    the method on the probe examples, which runs before any tile."""
    alone = symmetric and n1 == 1
    one = _working_bytes(engine, 1, 1, 1, True, cell_bytes) if alone else _tile_bytes(engine, 1, 1, cell_bytes)
    check = engine.check_bytes() if engine.probe is not None else 0.0
    needed = max(one, check)
    if needed <= budget:
        return
    tile = f"{_memory.format_bytes(one)} for {'its one example' if alone else 'one pair of examples'}"
    if check > one:
        tile = (f"{_memory.format_bytes(check)} to check itself on {engine.probe.shape[0]} example(s) "
                f"before the first tile ({tile})")
    default = "the default " if engine.default_budget else ""
    device = engine.probe.device if engine.probe is not None else torch.device("cpu")
    raise ValueError(
        f"{default}memory_budget of {_memory.format_bytes(budget)} is too small for even one tile: the "
        f"{engine.name} method needs about {tile}. "
        + _budget_advice(needed, budget, engine.default_budget, device))


def _tile_sizes(engine: _Engine, n1: int, n2: int, symmetric: bool, cell_bytes: float, budget: float,
                batch_size: Optional[int]) -> Tuple[int, int]:
    """Rows and columns of one tile; a symmetric kernel needs square tiles to mirror them."""
    b1, b2 = _plan_chunks(engine, n1, n2, cell_bytes, budget, batch_size, symmetric)
    if symmetric:
        b1 = b2 = min(b1, b2)
    engine.settle(max(b1, b2))
    return b1, b2


def _run_tiles(engine: _Engine, x1, x2, symmetric: bool, result: torch.Tensor, mode: str,
               budget: float, elt: int, batch_size: Optional[int], progress: bool) -> None:
    n1, n2 = x1.shape[0], x2.shape[0]
    cell = math.prod(result.shape[2:]) if result.dim() > 2 else 1
    b1, b2 = _tile_sizes(engine, n1, n2, symmetric, cell * elt, budget, batch_size)
    starts1 = list(range(0, n1, b1))
    starts2 = list(range(0, n2, b2))
    pairs = [(i, j) for i in starts1 for j in starts2 if not symmetric or j >= i]
    bar = _Progress(len(pairs), progress)
    try:
        cached2 = engine.features(x2) if (not symmetric and b2 >= n2) else None
        current_i, f1 = None, None
        last_j, last_f2 = None, None
        for i, j in pairs:
            if i != current_i:
                # in a symmetric kernel the previous row's last chunk is this row's first
                reused = last_f2 if symmetric and last_j == i else None
                # the budget holds the features of two chunks: those of finished tiles go
                # before the next are formed
                f1 = f2 = last_f2 = last_j = None
                current_i, f1 = i, (engine.features(x1[i:i + b1]) if reused is None else reused)
            same = symmetric and i == j
            if same:
                f2 = f1
            elif cached2 is not None:
                f2 = cached2
            else:
                f2 = last_f2 = None
                f2 = engine.features(x2[j:j + b2])
                last_j, last_f2 = j, f2
            rows = min(b1, n1 - i)
            cols = min(b2, n2 - j)
            block = result[i:i + rows, j:j + cols]
            engine.block(f1, f2, same, block)
            if symmetric and not same:
                mirrored = block.transpose(0, 1)
                if mode == "full":
                    mirrored = mirrored.transpose(2, 3)
                result[j:j + cols, i:i + rows] = mirrored
            bar.update()
    finally:
        # also when a tile fails or is interrupted: an open bar would stay on the screen
        bar.close()


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self._bar = None
        self._enabled = enabled
        self._done, self._total = 0, total
        if enabled:
            try:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=total, desc="lazykernel.ntk", unit="tile")
            except ImportError:
                pass

    def update(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self._enabled:
            print(f"\rlazykernel.ntk: {self._done}/{self._total} tiles", end="", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            print(file=sys.stderr)
