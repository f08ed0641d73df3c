"""The ``precision`` option of `ntk`, `plan`, `ntk_to_disk` and the products (`jvp`, `vjp`,
`ntk_vp`): exact float32, or TF32 on CUDA.

PyTorch decides with process-wide switches whether CUDA float32 matrix
products and cuDNN convolutions may round their inputs to TF32 (10 explicit
mantissa bits, float32 range and accumulation); cuDNN's default allows it. A
call on CUDA in float32 sets both switches for its duration and restores them
after, also on error, whether the caller set them with PyTorch's older API
(``allow_tf32``, ``set_float32_matmul_precision``) or its newer per-backend
``fp32_precision`` settings: ``"highest"`` turns TF32 off, so every product is a
float32 product, and ``"tf32"`` turns it on. With ``"tf32"`` the structured
method also forms the Gram of every single-position linear term (``T = 1``:
dense layers on vectors) as two cuBLAS GEMMs and a Hadamard product
(`gemm_gram_accumulate`), since the fused kernel has no tensor-core path;
terms over several positions keep the fused float32 kernel. Because the
switches are global, such calls hold a process-wide lock while they run: two
threads' calls take turns. On the CPU and in float64 nothing is switched and
``"tf32"`` computes as ``"highest"``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, Sequence, Tuple

import torch

PRECISIONS = ("highest", "tf32")
# held by a call while it has PyTorch's TF32 switches set its way
_SWITCHES = threading.RLock()


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    return precision


def uses_tf32(precision: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Does a call with this precision, device and compute dtype take TF32 products?"""
    return precision == "tf32" and device.type == "cuda" and dtype == torch.float32


# PyTorch 2.9 added per-backend ``fp32_precision`` settings beside the older switches
# (``allow_tf32``, ``set_float32_matmul_precision``), and the readers of either refuse
# to answer while the two disagree. A setting of ``"none"`` defers to its parent
# (``(backend, "all")``, then ``("generic", "all")``); cuDNN's start as a default that
# defers too but means TF32 where no parent is set, and which no setter can write.
_FP32_SETTINGS = hasattr(torch._C, "_get_fp32_precision_getter")
if _FP32_SETTINGS:
    _get, _put = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
# the (backend, op) settings a call may change: cuBLAS and oneDNN matmuls (set together by
# set_float32_matmul_precision), cuDNN convolutions and RNNs (set together by cudnn.allow_tf32)
_MATMULS = (("cuda", "matmul"), ("mkldnn", "matmul"))
_CUDNN = (("cuda", "conv"), ("cuda", "rnn"))
_PARENTS = (("cuda", "all"), ("mkldnn", "all"))


def _readable(read):
    """``read()``, or None where PyTorch refuses to answer (its two APIs disagree)."""
    try:
        return read()
    except RuntimeError:
        return None


def _own_settings() -> Dict[Tuple[str, str], str]:
    """Each setting a call may change, as set: its own value, ``"none"`` where it defers
    to its parents, ``"default"`` for cuDNN's initial one.

    PyTorch's getter answers what a setting resolves to, so whether a value is the
    setting's own shows by setting its parents for a moment and seeing if it follows.
    """
    generic = _get("generic", "all")
    parents = {}
    for parent in _PARENTS:
        value = _get(*parent)
        _put("generic", "all", "ieee" if value == "tf32" else "tf32")
        parents[parent] = "none" if _get(*parent) != value else value
        _put("generic", "all", generic)
    own = {}
    try:
        for value in ("none", "ieee"):
            for parent in _PARENTS:
                _put(*parent, value)
            _put("generic", "all", value)
            own[value] = {setting: _get(*setting) for setting in _MATMULS + _CUDNN}
    finally:
        for parent, value in parents.items():
            _put(*parent, value)
        _put("generic", "all", generic)
    return {setting: ("default" if unset == "tf32" and own["ieee"][setting] == "ieee" else unset)
            for setting, unset in own["none"].items()}


def _state() -> tuple:
    """What a call may change, as it was: the global matmul precision and cuDNN's switch
    (None where PyTorch refuses to read them), and each setting's own value."""
    matmul = _readable(torch.get_float32_matmul_precision)
    cudnn = _readable(lambda: torch.backends.cudnn.allow_tf32)
    return matmul, cudnn, _own_settings() if _FP32_SETTINGS else {}


def _set(tf32: bool, saved: tuple) -> tuple:
    """Let cuBLAS matmuls and cuDNN convolutions and RNNs take TF32 or not; returns what it
    wrote: (the global matmul precision, cuDNN's switch, the settings).

    The older API is set where the caller's settings let it be read, so that code inside
    the call reads the truth through it; a per-backend setting that still resolves the
    other way (it defers to a parent that says so) is then set explicitly.
    """
    matmul, cudnn, _ = saved
    value = "tf32" if tf32 else "ieee"
    wrote_matmul = matmul is not None or not _FP32_SETTINGS
    wrote_cudnn = cudnn is not None and cudnn != tf32 or not _FP32_SETTINGS
    written = set()
    if wrote_matmul:
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        written.update(_MATMULS)
    if wrote_cudnn:
        torch.backends.cudnn.allow_tf32 = tf32
        written.update(_CUDNN)
    if _FP32_SETTINGS:
        for setting in ((("cuda", "matmul"),) if not wrote_matmul else ()) + _CUDNN:
            if (_get(*setting) == "tf32") != tf32:
                _put(*setting, value)
                written.add(setting)
    return wrote_matmul, wrote_cudnn, written


def _restore(saved: tuple, wrote: tuple) -> None:
    matmul, cudnn, own = saved
    wrote_matmul, wrote_cudnn, written = wrote
    if wrote_matmul:
        torch.set_float32_matmul_precision(matmul)
    if wrote_cudnn:
        torch.backends.cudnn.allow_tf32 = cudnn
    for setting in written & own.keys():
        value = own[setting]
        if value == "default":
            # not writable: "none" behaves the same while a parent is set, "tf32" while none is
            value = "none" if _get(setting[0], "all") != "none" else "tf32"
        _put(*setting, value)


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, CUDA float32 products and convolutions follow ``precision``.

    Every setting the block changes is restored on exit, also when the block
    raises, whichever of PyTorch's APIs the caller set them with; the lock makes
    calls from several threads take turns rather than undo each other's switches.
    """
    if device.type != "cuda" or dtype != torch.float32:
        yield
        return
    with _SWITCHES:
        saved = _state()
        wrote = (False, False, set())
        try:
            wrote = _set(precision == "tf32", saved)
            yield
        finally:
            _restore(saved, wrote)


def gemm_gram_accumulate(out: torch.Tensor, a1: Sequence[torch.Tensor], a2: Sequence[torch.Tensor],
                         g1: Sequence[torch.Tensor], g2: Sequence[torch.Tensor], output: str) -> torch.Tensor:
    """`gram_hadamard_accumulate` for single-position terms, by GEMMs: ``Σ_l (A Bᵀ) ∘ (G Hᵀ)``.

    Every ``a: [N, 1, K]`` and ``g: [N, 1, O, D]``. Per term: one GEMM for the
    inputs' Gram ``S`` (``[N1, N2]``), and for the cotangents one GEMM over all
    outputs (trace), one per output (diagonal) or one per output pair (full),
    each added to ``out`` multiplied by ``S``. Two ``[N1, N2]`` buffers are
    the only temporaries. Same arguments and result as the fused op.
    """
    if not a1:
        return out
    for term, operands in enumerate(zip(a1, a2, g1, g2)):
        if any(t.shape[1] != 1 for t in operands):
            # a term over several positions must not be read at its first position only
            shapes = ", ".join(f"{name} {list(t.shape)}" for name, t in zip(("a1", "a2", "g1", "g2"), operands))
            raise ValueError(f"gemm_gram_accumulate takes single-position terms (T = 1 in a1, a2, g1 and g2); "
                             f"term {term} has {shapes}: pass terms over several positions to "
                             "gram_hadamard_accumulate")
    n1, n2 = out.shape[0], out.shape[1]
    s = torch.empty((n1, n2), dtype=out.dtype, device=out.device)
    u = torch.empty_like(s)
    for a, b, g, h in zip(a1, a2, g1, g2):
        torch.mm(a[:, 0], b[:, 0].t(), out=s)
        g, h = g[:, 0], h[:, 0]                                  # [N, O, D]
        if output == "trace":
            # sizes spelled out: with no examples on a side, -1 would be undetermined
            features = g.shape[1] * g.shape[2]
            torch.mm(g.reshape(n1, features), h.reshape(n2, features).t(), out=u)
            out.addcmul_(s, u)
        elif output == "diagonal":
            for o in range(g.shape[1]):
                torch.mm(g[:, o], h[:, o].t(), out=u)
                out[:, :, o].addcmul_(s, u)
        else:
            for o in range(g.shape[1]):
                for p in range(h.shape[1]):
                    torch.mm(g[:, o], h[:, p].t(), out=u)
                    out[:, :, o, p].addcmul_(s, u)
    return out
