"""Per-example Jacobians and NTK-vector products through torch.func.

These are the generic paths: they work for any model whose examples are
independent, at the price of materialising ``[N, O, P]`` Jacobians (or
``[N·O, P]`` tangents). When a model cannot be vmapped (data-dependent control
flow, ``.item()``, unsupported ops) they fall back to loops with the same result.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch.func import jacrev, jvp, vjp, vmap

from lazykernel._model import ModelAdapter


def per_example_jacobian(adapter: ModelAdapter, names: List[str], x: torch.Tensor, by_loop: bool = False
                         ) -> torch.Tensor:
    """Jacobian of each example's outputs with respect to the parameters ``names``.

    Args:
        adapter: the model.
        names: selected parameter names (a subset of ``adapter.params``).
        x: ``[N, *in]`` inputs.
        by_loop: one plain backward per example and output instead of torch.func's
            vmap, for models whose batched backward PyTorch gets wrong.

    Returns:
        ``[N, O, P]`` with P the total size of ``names`` in the given order.
    """
    if by_loop:
        return _per_example_jacobian_by_backward(adapter, names, x)
    values = {name: adapter.params[name].detach() for name in names}
    others = {name: p.detach() for name, p in adapter.params.items() if name not in values}

    def f_single(diff: Dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        merged = dict(others)
        merged.update(diff)
        return adapter.call(merged, xi.unsqueeze(0)).reshape(-1)

    n = x.shape[0]
    try:
        jac = vmap(jacrev(f_single), in_dims=(None, 0))(values, x)
    except Exception:
        jac = _per_example_jacobian_loop(f_single, values, x)
    return torch.cat([jac[name].reshape(n, jac[name].shape[1], -1) for name in names], dim=2)


def _per_example_jacobian_by_backward(adapter: ModelAdapter, names: List[str], x: torch.Tensor) -> torch.Tensor:
    values, params = adapter.with_leaves(names)
    rows = []
    with torch.enable_grad():
        for i in range(x.shape[0]):
            y = adapter.call(values, x[i:i + 1]).reshape(-1)
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

    A model with an op that has no forward-mode AD takes the products with
    ``x2``'s per-example Jacobians instead (reverse mode, ``[N2, O, P]``).
    """
    values = adapter.detached_params()
    n1, n2 = x1.shape[0], x2.shape[0]
    y1, vjp_fn = vjp(lambda p: adapter.call(p, x1).reshape(-1), values)
    basis = torch.eye(y1.numel(), dtype=y1.dtype, device=y1.device)
    rows = ntvp_rows(adapter, values, vjp_fn, x2, basis, by_loop)
    return rows.reshape(n1, y1.numel() // n1, n2, -1)


def forward_mode_works(adapter: ModelAdapter, values: Dict[str, torch.Tensor], x: torch.Tensor) -> bool:
    """Does every op of the model on ``x`` have forward-mode AD (one JVP in the parameters)?"""
    tangent = {name: torch.zeros_like(value) for name, value in values.items()}
    try:
        jvp(lambda p: adapter.call(p, x), (values,), (tangent,))
    except NotImplementedError:
        return False
    return True


def ntvp_rows(adapter: ModelAdapter, values: Dict[str, torch.Tensor], vjp_fn, x2: torch.Tensor,
              seeds: torch.Tensor, by_loop: bool) -> torch.Tensor:
    """``[S, N2·O]``: ``J2 (J1ᵀ s)`` for each of the ``S`` rows ``s`` of ``seeds``,
    where ``vjp_fn`` is the VJP of ``x1``'s flattened outputs."""

    def f2(p):
        return adapter.call(p, x2).reshape(-1)

    def row(v):
        (tangent,) = vjp_fn(v)
        return jvp(f2, (values,), (tangent,))[1]

    if not by_loop:
        try:
            return vmap(row)(seeds)
        except Exception:
            pass
    try:
        return torch.stack([row(v) for v in seeds])
    except NotImplementedError:
        # an op without forward-mode AD: J2 from reverse mode, then one product
        names = list(values)
        jac = per_example_jacobian(adapter, names, x2, by_loop=by_loop)          # [N2, O, P]
        if by_loop:
            tangents = [vjp_fn(v)[0] for v in seeds]
            flat = torch.stack([torch.cat([t[name].reshape(-1) for name in names]) for t in tangents])
        else:
            batched = vmap(vjp_fn)(seeds)[0]
            flat = torch.cat([batched[name].reshape(seeds.shape[0], -1) for name in names], 1)
        return flat.to(jac.dtype) @ jac.reshape(-1, jac.shape[2]).T
