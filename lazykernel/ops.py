"""The compiled ops of lazykernel: typed wrappers, pure-PyTorch references, fake kernels.

Each op has one reference implementation here, written the plain way; it is
the definition the C++ and CUDA kernels are tested against, and the fallback
when no compiled kernel exists for a tensor's device.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from lazykernel import _extension

OUTPUTS = ("trace", "diagonal", "full")


def gram_hadamard_accumulate_reference(
    out: torch.Tensor,
    a1: Sequence[torch.Tensor],
    a2: Sequence[torch.Tensor],
    g1: Sequence[torch.Tensor],
    g2: Sequence[torch.Tensor],
    output: str = "trace",
    symmetric: bool = False,
) -> None:
    """Pure-PyTorch definition of :func:`gram_hadamard_accumulate` (same arguments).

    Materialises each layer's ``[N1·T, N2·T]`` Gram matrices: exact and simple,
    not memory-frugal. ``symmetric`` is a speed promise only and is ignored.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    _check_gram_inputs(out, a1, a2, g1, g2, output, symmetric)
    for A, B, G, H in zip(a1, a2, g1, g2):
        # S[i, t, j, s] = a1[i, t] . a2[j, s]
        S = torch.einsum("itk,jsk->itjs", A, B)
        if output == "trace":
            U = torch.einsum("itod,jsod->itjs", G, H)
            out += (S * U).sum(dim=(1, 3))
        elif output == "diagonal":
            U = torch.einsum("itod,jsod->itjso", G, H)
            out += (S.unsqueeze(-1) * U).sum(dim=(1, 3))
        else:
            U = torch.einsum("itod,jspd->itjsop", G, H)
            out += (S[..., None, None] * U).sum(dim=(1, 3))


def _check_gram_inputs(out: torch.Tensor, a1: Sequence[torch.Tensor], a2: Sequence[torch.Tensor],
                       g1: Sequence[torch.Tensor], g2: Sequence[torch.Tensor], output: str,
                       symmetric: bool) -> None:
    """The compiled op's argument checks, with its messages, for the reference."""
    def fail(message: str) -> None:
        raise RuntimeError(f"gram_hadamard_accumulate_: {message}")

    if out.dtype not in (torch.float32, torch.float64):
        fail(f"out must be float32 or float64, got {out.dtype}")
    if not len(a1) == len(a2) == len(g1) == len(g2):
        fail(f"a1, a2, g1, g2 must list the same number of layers, got "
             f"{len(a1)}, {len(a2)}, {len(g1)}, {len(g2)}")
    dims = {"trace": 2, "diagonal": 3, "full": 4}[output]
    if out.dim() != dims:
        fail(f"for output='{output}' out must have {dims} dimensions, got shape {list(out.shape)}")
    n1, n2 = out.shape[0], out.shape[1]
    if output == "full" and out.shape[3] != out.shape[2]:
        fail(f"full out must be [N1, N2, O, O], got shape {list(out.shape)}")
    if symmetric and n1 != n2:
        fail(f"symmetric=True needs N1 == N2, got out of shape {list(out.shape)}")
    outputs = out.shape[2] if output != "trace" else None
    for layer, (A, B, G, H) in enumerate(zip(a1, a2, g1, g2)):
        for name, tensor, expected in (("a1", A, 3), ("a2", B, 3), ("g1", G, 4), ("g2", H, 4)):
            if tensor.dim() != expected:
                fail(f"{name}[{layer}] must have {expected} dimensions, got shape {list(tensor.shape)}")
            if tensor.dtype != out.dtype:
                fail(f"{name}[{layer}] has dtype {tensor.dtype} but out has dtype {out.dtype}; "
                     "all tensors must share one dtype")
            if tensor.device != out.device:
                fail(f"{name}[{layer}] is on {tensor.device} but out is on {out.device}")
            if tensor.requires_grad and torch.is_grad_enabled():
                fail(f"{name}[{layer}] requires grad, but the op has no derivative (it adds to out in "
                     "place and records nothing for autograd); call it under torch.no_grad() or pass "
                     f"{name}[{layer}].detach()")
        shapes = f"a1 {list(A.shape)}, a2 {list(B.shape)}, g1 {list(G.shape)}, g2 {list(H.shape)}"
        if A.shape[0] != n1 or G.shape[0] != n1:
            fail(f"layer {layer}: a1 and g1 must have N1 = {n1} rows like out, got {shapes}")
        if B.shape[0] != n2 or H.shape[0] != n2:
            fail(f"layer {layer}: a2 and g2 must have N2 = {n2} rows like out, got {shapes}")
        if not A.shape[1] == B.shape[1] == G.shape[1] == H.shape[1]:
            fail(f"layer {layer}: a1, a2, g1, g2 must share the positions axis T (dim 1), got {shapes}")
        if A.shape[2] != B.shape[2]:
            fail(f"layer {layer}: a1 and a2 must share their last dimension K, got {shapes}")
        if G.shape[2:] != H.shape[2:]:
            fail(f"layer {layer}: g1 and g2 must share [O, D], got {shapes}")
        if outputs is None:
            outputs = G.shape[2]
        if G.shape[2] != outputs:
            fail(f"layer {layer} has O = {G.shape[2]} outputs but "
                 f"{'an earlier layer has' if output == 'trace' else 'out has'} {outputs}")
    for layer, (A, B, G, H) in enumerate(zip(a1, a2, g1, g2) if symmetric else ()):
        a_same = A is B or torch.equal(A, B)
        if not (a_same and (G is H or torch.equal(G, H))):
            side = ("g2", "g1") if a_same else ("a2", "a1")
            fail(f"symmetric=True promises a2 == a1 and g2 == g1, but {side[0]}[{layer}] differs from "
                 f"{side[1]}[{layer}]; pass symmetric=False for two different sets of examples")


def gram_hadamard_accumulate(
    out: torch.Tensor,
    a1: Sequence[torch.Tensor],
    a2: Sequence[torch.Tensor],
    g1: Sequence[torch.Tensor],
    g2: Sequence[torch.Tensor],
    output: str = "trace",
    symmetric: bool = False,
) -> torch.Tensor:
    """Fused Hadamard-Gram accumulate: the NTK term of linear maps, summed over layers.

    For layers ``l`` with inputs ``a1[l]: [N1, T, K]``, ``a2[l]: [N2, T, K]`` and
    output cotangents ``g1[l]: [N1, T, O, D]``, ``g2[l]: [N2, T, O, D]``, adds in place::

        trace    out[i, j]       += Σ_l Σ_{t,s} (a1[i,t]·a2[j,s]) Σ_o (g1[i,t,o]·g2[j,s,o])
        diagonal out[i, j, o]    += Σ_l Σ_{t,s} (a1[i,t]·a2[j,s]) (g1[i,t,o]·g2[j,s,o])
        full     out[i, j, o, p] += Σ_l Σ_{t,s} (a1[i,t]·a2[j,s]) (g1[i,t,o]·g2[j,s,p])

    ``out`` is ``[N1, N2]``, ``[N1, N2, O]`` or ``[N1, N2, O, O]``. T, K and D may
    differ between layers; O may not. All tensors share one dtype (float32 or
    float64) and device. ``symmetric=True`` promises ``a1 is a2`` and ``g1 is g2``
    so that only half of the tiles are computed; operands that are not the same
    tensors are compared element-wise first (on a GPU that waits for the result),
    and different ones are refused. ``out`` must not share memory with the
    operands. The op has no derivative: on every backend the operands are used
    as constants (detached), so no gradient flows to them through ``out``
    (the raw ``torch.ops.lazykernel.gram_hadamard_accumulate_`` refuses operands
    that require grad outside ``torch.no_grad()``). This is the rule of
    Novak et al. (2022), "Fast Finite Width Neural Tangent Kernel", for a dense
    layer: the per-sample weight gradient is ``Σ_t g_t a_tᵀ``.

    Returns:
        ``out``, updated in place.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    for name, terms in (("a1", a1), ("a2", a2), ("g1", g1), ("g2", g2)):
        if isinstance(terms, torch.Tensor):
            raise ValueError(f"{name} must be a list of tensors, one per layer; got one tensor of shape "
                             f"{tuple(terms.shape)} (for a single layer pass [{name}])")
    # one detached view per tensor, so that a symmetric call's operands stay the same tensors
    detached: dict = {}

    def constant(t: torch.Tensor) -> torch.Tensor:
        if not (isinstance(t, torch.Tensor) and t.requires_grad):
            return t
        return detached.setdefault(id(t), t.detach())

    a1, a2, g1, g2 = ([constant(t) for t in terms] for terms in (a1, a2, g1, g2))
    if _extension.has_kernel(out.device):
        torch.ops.lazykernel.gram_hadamard_accumulate_(out, a1, a2, g1, g2, output, symmetric)
    else:
        gram_hadamard_accumulate_reference(out, a1, a2, g1, g2, output, symmetric)
    return out


# gathered elements per batch of `token_gram_accumulate` where no budget asks for fewer
TOKEN_BATCH_ELEMENTS = 1 << 22


def token_pairs_per_batch(max_pairs_elements: int, outputs: int, d: int, output: str) -> int:
    """Row pairs in a batch of `token_gram_accumulate`: its largest temporary holds, per
    pair, the gathered rows (and their product), ``[O, D]``, or the full mode's ``[O, O]``
    block, and at most ``max_pairs_elements`` elements (but at least one pair)."""
    per_pair = max(outputs * d, outputs * outputs if output == "full" else 0)
    return max(1, max_pairs_elements // max(per_pair, 1))


def token_gram_accumulate(
    out: torch.Tensor,
    rows1: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rows2: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    output: str = "trace",
    max_pairs_elements: int = TOKEN_BATCH_ELEMENTS,
) -> torch.Tensor:
    """Gram of per-example gradients that are sparse in token ids, added to ``out``.

    ``rows = (example: [M], ids: [M], g: [M, O, D])`` lists, for each distinct
    (example, id), the gradient of every output with respect to that row of an
    embedding table (no (example, id) twice). Two examples' gradients meet
    only where they share an id, so::

        trace    out[i, j]       += Σ_{m: ex1=i} Σ_{q: ex2=j, id2=id1[m]} Σ_o g1[m,o]·g2[q,o]
        diagonal out[i, j, o]    += ... g1[m,o]·g2[q,o]
        full     out[i, j, o, p] += ... g1[m,o]·g2[q,p]

    The matching row pairs are found by sorting the ids, and processed in
    batches whose temporaries (gathered rows, their products, the full mode's
    ``[O, O]`` blocks) hold at most ``max_pairs_elements`` elements each, except
    that a batch holds at least all the partners of one row. The cost is
    proportional to the number of shared tokens, not to ``N1·N2·T²``.

    Returns:
        ``out``, updated in place.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    ex1, ids1, g1 = rows1
    ex2, ids2, g2 = rows2
    if ids1.numel() == 0 or ids2.numel() == 0:
        return out
    sorted2, order2 = torch.sort(ids2)
    lo = torch.searchsorted(sorted2, ids1, right=False)
    counts = torch.searchsorted(sorted2, ids1, right=True) - lo
    batch_rows = token_pairs_per_batch(max_pairs_elements, g1.shape[1], g1.shape[2], output)
    ends = torch.cumsum(counts, 0)
    start_row = 0
    m1 = ids1.numel()
    while start_row < m1:
        # the largest run of rows whose pairs fit in one batch (at least one row)
        base = int(ends[start_row - 1]) if start_row else 0
        stop = int(torch.searchsorted(ends, torch.tensor(base + batch_rows, device=ends.device),
                                      right=True))
        stop = min(max(stop, start_row + 1), m1)
        c = counts[start_row:stop]
        total = int(c.sum())
        if total:
            local = torch.repeat_interleave(torch.arange(start_row, stop, device=c.device), c)
            first = torch.cumsum(c, 0) - c
            offset = torch.arange(total, device=c.device) - torch.repeat_interleave(first, c)
            partner = order2[lo[local] + offset]
            left, right = g1[local], g2[partner]
            if output == "trace":
                values = (left * right).sum(dim=(1, 2))
            elif output == "diagonal":
                values = (left * right).sum(dim=2)
            else:
                values = torch.bmm(left, right.transpose(1, 2))
            out.index_put_((ex1[local], ex2[partner]), values.to(out.dtype), accumulate=True)
            # freed before the next batch is gathered, not when its names are rebound:
            # a batch's temporaries then never meet the next one's
            del left, right, values, local, partner
        start_row = stop
    return out


if _extension._LOADED:

    @torch.library.register_fake("lazykernel::gram_hadamard_accumulate_")
    def _gram_hadamard_accumulate_fake(out, a1, a2, g1, g2, output, symmetric):
        # The op mutates `out` and returns nothing: shapes need no propagation,
        # but the checks that do not need data can still be done early.
        torch._check(len(a1) == len(a2) == len(g1) == len(g2),
                     lambda: "a1, a2, g1, g2 must list the same number of layers")
        return None


def linear_jvp_reference(
    xs: torch.Tensor,
    weight: torch.Tensor,
    weight_dot: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    bias_dot: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure-PyTorch definition of the ``linear_jvp`` op (arguments as :func:`linear_jvp_stacked`)."""
    x = xs[0]
    y = x @ weight.T
    y_dot = torch.zeros_like(y)
    if xs.shape[0] == 2:
        y_dot = y_dot + xs[1] @ weight.T
    if weight_dot is not None:
        y_dot = y_dot + x @ weight_dot.T
    if bias is not None:
        y = y + bias
    if bias_dot is not None:
        y_dot = y_dot + bias_dot
    return torch.stack([y, y_dot])


def linear_jvp_stacked(
    xs: torch.Tensor,
    weight: torch.Tensor,
    weight_dot: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    bias_dot: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Value and tangent of ``y = x Wᵀ + b`` with input and tangent in one buffer.

    Args:
        xs: ``[2, M, K]`` (``xs[0] = x``, ``xs[1] = ẋ``) or ``[1, M, K]`` when the
            input's tangent is zero.
        weight: ``W: [D, K]``; ``weight_dot``: ``Ẇ: [D, K]`` or None (zero).
        bias: ``b: [D]`` or None; ``bias_dot``: ``ḃ: [D]`` or None (zero).

    Returns:
        ``[2, M, D]``: ``[x Wᵀ + b, ẋ Wᵀ + x Ẇᵀ + ḃ]``. The compiled kernels
        multiply x and ẋ by W in one GEMM (W read once), then add ``x Ẇᵀ``:
        6·M·K·D FLOPs with a tangent input, 4·M·K·D without.
    """
    if _extension.has_kernel(xs.device) and xs.dtype in (torch.float32, torch.float64):
        return torch.ops.lazykernel.linear_jvp(xs, weight, weight_dot, bias, bias_dot)
    return linear_jvp_reference(xs, weight, weight_dot, bias, bias_dot)


def linear_jvp(
    x: torch.Tensor,
    x_dot: Optional[torch.Tensor],
    weight: torch.Tensor,
    weight_dot: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    bias_dot: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward and Jacobian-vector product of a linear map ``y = x Wᵀ + b``.

    Args:
        x: ``[*batch, K]`` input; ``x_dot``: its tangent, same shape, or None (zero).
        weight: ``[D, K]``; ``weight_dot``: ``[D, K]`` or None (zero).
        bias: ``[D]`` or None; ``bias_dot``: ``[D]`` or None (zero).

    Returns:
        ``(y, y_dot)``, each ``[*batch, D]``: ``y = x Wᵀ + b`` and
        ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ``.
    """
    if x.dim() < 1 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x must be [*batch, K] with K = {weight.shape[-1]} (weight is "
                         f"{tuple(weight.shape)}), got {tuple(x.shape)}")
    if x_dot is not None and x_dot.shape != x.shape:
        raise ValueError(f"x_dot must have the shape of x {tuple(x.shape)}, got {tuple(x_dot.shape)}")
    if x_dot is not None and x_dot.dtype != x.dtype:
        raise ValueError(f"x_dot must have the dtype of x ({x.dtype}), got {x_dot.dtype}")
    batch = x.shape[:-1]
    # sizes spelled out, not -1: an empty batch (or K = 0, D = 0) leaves -1 undetermined
    shape = (1, math.prod(batch), x.shape[-1])
    rows = x.reshape(shape)
    xs = rows if x_dot is None else torch.cat([rows, x_dot.reshape(shape)])
    out = linear_jvp_stacked(xs, weight, weight_dot, bias, bias_dot)
    return out[0].reshape(*batch, weight.shape[0]), out[1].reshape(*batch, weight.shape[0])


if _extension._LOADED:

    @torch.library.register_fake("lazykernel::linear_jvp")
    def _linear_jvp_fake(xs, weight, weight_dot, bias, bias_dot):
        torch._check(xs.dim() == 3, lambda: "xs must be [S, M, K]")
        torch._check(weight.dim() == 2, lambda: "weight must be [D, K]")
        return xs.new_empty((2, xs.shape[1], weight.shape[0]))

    def _linear_jvp_setup(ctx, inputs, output):
        xs, weight, weight_dot, bias, bias_dot = inputs
        ctx.save_for_backward(xs, weight, weight_dot)
        ctx.has_bias, ctx.has_bias_dot = bias is not None, bias_dot is not None

    def _linear_jvp_backward(ctx, grad):
        # y = x Wᵀ + b and ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ, differentiated in each argument
        xs, weight, weight_dot = ctx.saved_tensors
        gy, gyd = grad[0], grad[1]
        x = xs[0]
        dx = gy @ weight
        if weight_dot is not None:
            dx = dx + gyd @ weight_dot
        dweight = gy.T @ x
        if xs.shape[0] == 2:
            dxs = torch.stack([dx, gyd @ weight])
            dweight = dweight + gyd.T @ xs[1]
        else:
            dxs = dx.unsqueeze(0)
        dweight_dot = gyd.T @ x if weight_dot is not None else None
        dbias = gy.sum(0) if ctx.has_bias else None
        dbias_dot = gyd.sum(0) if ctx.has_bias_dot else None
        return dxs, dweight, dweight_dot, dbias, dbias_dot

    torch.library.register_autograd("lazykernel::linear_jvp", _linear_jvp_backward,
                                    setup_context=_linear_jvp_setup)
