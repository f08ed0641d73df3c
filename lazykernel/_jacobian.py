"""Per-example Jacobians and NTK-vector products through torch.func.

These are the generic paths: they work for any model whose examples are
independent, at the price of materialising ``[N, O, P]`` Jacobians (or
``[N·O, P]`` tangents). When a model cannot be vmapped (data-dependent control
flow, ``.item()``, unsupported ops) they fall back to loops with the same result.
"""

from __future__ import annotations

import math
from typing import Dict, List, Union

import torch
from torch.func import jacrev, jvp, vjp, vmap

from lazykernel._model import ModelAdapter


class VmapFailed(RuntimeError):
    """torch.func's vmap over the examples raised on this model (see `per_example_jacobian`)."""


def per_example_jacobian(adapter: ModelAdapter, names: List[str], x: torch.Tensor,
                         by_loop: Union[bool, str] = False, strict: bool = False) -> torch.Tensor:
    """Jacobian of each example's outputs with respect to the parameters ``names``.

    Args:
        adapter: the model.
        names: selected parameter names (a subset of ``adapter.params``).
        x: ``[N, *in]`` inputs.
        by_loop: ``False``: torch.func's vmap of ``jacrev`` over the examples, or
            where vmap raises a loop of ``jacrev`` over them; ``"examples"``: that
            loop from the start, for models whose vmap raised when they were
            checked (a batching rule that fails on some batches can be silently
            wrong on others, see `lazykernel._structured.jacobian_loop`);
            ``True``: one plain backward per example and output, for models
            whose batched backward PyTorch gets wrong.
        strict: raise `VmapFailed` where vmap raises, instead of looping.

    Returns:
        ``[N, O, P]`` with P the total size of ``names`` in the given order.
    """
    if by_loop is True:
        return _per_example_jacobian_by_backward(adapter, names, x)
    values = {name: adapter.params[name].detach() for name in names}
    others = {name: p.detach() for name, p in adapter.params.items() if name not in values}

    def f_single(diff: Dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        merged = dict(others)
        merged.update(diff)
        return one_row_per_example(adapter.call(merged, xi.unsqueeze(0)), 1).reshape(-1)

    n = x.shape[0]
    if by_loop == "examples":
        jac = _per_example_jacobian_loop(f_single, values, x)
    else:
        try:
            jac = vmap(jacrev(f_single), in_dims=(None, 0))(values, x)
        except Exception as error:
            if strict:
                raise VmapFailed(str(error)) from error
            jac = _per_example_jacobian_loop(f_single, values, x)
    return torch.cat([jac[name].reshape(n, jac[name].shape[1], -1) for name in names], dim=2)


def one_row_per_example(y: torch.Tensor, n: int) -> torch.Tensor:
    """``y``, the model's output for ``n`` examples, once it is seen to have one row per example.

    The probe of `lazykernel.ntk` checks the batch axis on a few examples; a model
    whose output has a fixed number of rows that happens to be the probe's would
    otherwise have its rows taken for examples.
    """
    if y.dim() == 0 or y.shape[0] != n:
        raise ValueError(
            f"the model returned shape {tuple(y.shape)} for {n} example(s): its output must have the batch "
            "dimension first, one row per example, so a forward that slices, reduces or reshapes the "
            "batch axis has no per-example NTK; return the outputs of all examples, in their order"
        )
    return y


def _per_example_jacobian_by_backward(adapter: ModelAdapter, names: List[str], x: torch.Tensor) -> torch.Tensor:
    values, params = adapter.with_leaves(names)
    rows = []
    with torch.enable_grad():
        for i in range(x.shape[0]):
            y = one_row_per_example(adapter.call(values, x[i:i + 1]), 1).reshape(-1)
            for o in range(y.numel()):
                grads = torch.autograd.grad(y[o], params, retain_graph=o + 1 < y.numel(), allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                       for g, p in zip(grads, params)]))
    o = len(rows) // max(x.shape[0], 1)
    p = sum(leaf.numel() for leaf in params)
    return torch.stack(rows).reshape(x.shape[0], o, p) if rows else x.new_zeros(0, 0, p)


def _per_example_jacobian_loop(f_single, values, x):
    rows = [jacrev(f_single)(values, x[i]) for i in range(x.shape[0])]
    return {name: torch.stack([row[name] for row in rows]) for name in values}


def ntk_block_by_ntvp(adapter: ModelAdapter, x1: torch.Tensor, x2: torch.Tensor, by_loop: bool = False
                      ) -> torch.Tensor:
    """``Θ(x1, x2)`` as ``[N1, O, N2, O]`` from NTK-vector products.

    One VJP through ``x1`` per basis vector of the ``N1·O`` outputs gives a row of
    ``J1ᵀ``; a JVP through ``x2`` with it gives that row of ``J2 J1ᵀ``. This is
    the second method of the torch.func NTK tutorial.

    Args:
        by_loop: one plain VJP and JVP per row instead of torch.func's vmap, for
            models whose batched backward PyTorch gets wrong (`ntvp_agrees`).

    A model whose JVPs forward mode cannot give as reverse mode does (an op
    without forward-mode AD, or parameters used under ``torch.no_grad``, see
    `forward_mode_works`) takes the products with ``x2``'s per-example
    Jacobians instead (reverse mode, ``[N2, O, P]``).
    """
    values = adapter.detached_params()
    n1, n2 = x1.shape[0], x2.shape[0]
    y1, vjp_fn = vjp(lambda p: one_row_per_example(adapter.call(p, x1), n1).reshape(-1), values)
    basis = torch.eye(y1.numel(), dtype=y1.dtype, device=y1.device)
    rows = ntvp_rows(adapter, values, vjp_fn, x2, basis, by_loop)
    return rows.reshape(n1, y1.numel() // n1, n2, -1)


def forward_mode_works(adapter: ModelAdapter, values: Dict[str, torch.Tensor], x: torch.Tensor) -> bool:
    """Does forward-mode AD give the model's derivative on ``x``, as reverse mode does?

    False where an op of the model has no forward-mode AD, and where the two modes
    disagree: ``torch.no_grad`` stops reverse mode only, so a forward that computes
    from the parameters under it (a power iteration, a frozen branch) gets JVPs with
    terms that autograd's gradients, and so the kernel, leave out. Along a random
    direction ``d`` of the parameters and random weights ``u`` of the outputs,
    ``uᵀ(J d)`` from one JVP is compared with ``(Jᵀu)·d`` from one VJP. The answer is
    kept on the adapter (`ModelAdapter.forward_mode_agrees`) for `ntvp_rows` and the products.
    """
    # (imported here: the structured method's module imports this one)
    from lazykernel._structured import _rank_one_direction

    gen = torch.Generator(device="cpu").manual_seed(4)
    direction = {name: _rank_one_direction(value, gen) for name, value in values.items()}
    try:
        y, along = jvp(lambda p: adapter.call(p, x), (values,), (direction,))
    except NotImplementedError:
        adapter.forward_mode_agrees = False
        return False
    _, vjp_fn = vjp(lambda p: adapter.call(p, x), values)
    # detached: parameters outside the selection may still require grad in the module's call
    y, along = y.detach(), along.detach()
    u = (torch.rand(y.shape, generator=gen, dtype=torch.float64) + 0.5).to(y)
    (pulled,) = vjp_fn(u)
    pulled = {name: g.detach() for name, g in pulled.items()}
    forward = float((along.double() * u.double()).sum())
    # parameter by parameter, so that float64 copies of one parameter at a time are made
    reverse, pulled_norm2, direction_norm2 = 0.0, 0.0, 0.0
    for name, d in direction.items():
        g, d = pulled[name].double(), d.double()
        reverse += float((g * d).sum())
        pulled_norm2 += float(g.square().sum())
        direction_norm2 += float(d.square().sum())
    scale = max(math.sqrt(pulled_norm2 * direction_norm2), float(along.double().norm() * u.double().norm()), 1e-30)
    dtypes = {y.dtype} | {value.dtype for value in values.values()}
    adapter.forward_mode_agrees = abs(forward - reverse) <= _agreement_tolerance(dtypes) * scale
    return adapter.forward_mode_agrees


def _agreement_tolerance(dtypes) -> float:
    """Relative difference of two products of the same derivative that round-off explains,
    for a model computing in ``dtypes``: relative to the Cauchy-Schwarz bound of the
    products, round-off measured below a tenth of the coarsest dtype's epsilon (float32
    MLP, CNN with BatchNorm and transformer), and below 4e-5 for bfloat16 and float16
    models (MLPs of up to 32 layers with LayerNorm, CNNs with BatchNorm or GroupNorm,
    transformers of up to 8 layers). Half precision is held to 2e-4, not 100 epsilons: a
    weight also used under ``torch.no_grad`` (a copy added to it) differed by 5e-4 to 1e-3,
    and passed as round-off the products were 2 to 20 % off."""
    eps = max(torch.finfo(dtype).eps for dtype in dtypes if dtype.is_floating_point)
    return min(100 * eps, 2e-4)


def ntvp_rows(adapter: ModelAdapter, values: Dict[str, torch.Tensor], vjp_fn, x2: torch.Tensor,
              seeds: torch.Tensor, by_loop: bool, strict: bool = False) -> torch.Tensor:
    """``[S, N2·O]``: ``J2 (J1ᵀ s)`` for each of the ``S`` rows ``s`` of ``seeds``,
    where ``vjp_fn`` is the VJP of ``x1``'s flattened outputs. With ``strict``, a vmap
    over the rows that raises raises `VmapFailed` instead of looping."""

    def f2(p):
        return one_row_per_example(adapter.call(p, x2), x2.shape[0]).reshape(-1)

    def row(v):
        (tangent,) = vjp_fn(v)
        return jvp(f2, (values,), (tangent,))[1]

    if adapter.forward_mode_agrees is not False:
        if not by_loop:
            try:
                return vmap(row)(seeds)
            except Exception as error:
                if strict:
                    raise VmapFailed(str(error)) from error
        try:
            return torch.stack([row(v) for v in seeds])
        except NotImplementedError:
            pass
    # an op without forward-mode AD, or forward mode that differs from reverse mode
    # (`forward_mode_works`): J2 from reverse mode, then one product
    names = list(values)
    jac = per_example_jacobian(adapter, names, x2, by_loop=by_loop, strict=strict)     # [N2, O, P]
    if by_loop:
        tangents = [vjp_fn(v)[0] for v in seeds]
        flat = torch.stack([torch.cat([t[name].reshape(-1) for name in names]) for t in tangents])
    else:
        batched = vmap(vjp_fn)(seeds)[0]
        flat = torch.cat([batched[name].reshape(seeds.shape[0], -1) for name in names], 1)
    return flat.to(jac.dtype) @ jac.reshape(-1, jac.shape[2]).T
