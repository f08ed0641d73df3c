"""Loading of the compiled operator library and the report of which backend runs.

`import lazykernel` must work without the compiled library (a source checkout,
a failed build, an ABI mismatch): then the pure-PyTorch reference of each op is
used, one warning says so, and `backend()` says why.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import List, Optional

import torch

_LOAD_ERROR: Optional[str] = None
_LOADED = False
# every op the Python side calls, with its arguments: a library built from older sources
# lacks some, and registering their fake kernels (or calling them) would fail
_OPS = {
    "gram_hadamard_accumulate_": ("out", "a1", "a2", "g1", "g2", "output", "symmetric"),
    "linear_jvp": ("xs", "weight", "weight_dot", "bias", "bias_dot"),
}
_DISABLE = "LAZYKERNEL_DISABLE_EXTENSION"


def _disabled() -> bool:
    """Whether the environment asks for the reference kernels (1, true, yes or on)."""
    value = os.environ.get(_DISABLE, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value not in ("", "0", "false", "no", "off"):
        warnings.warn(f"lazykernel: {_DISABLE}={os.environ[_DISABLE]!r} is neither on nor off, so the "
                      f"compiled extension is used; set it to 1 to use the reference kernels, or to 0 "
                      "(or unset it) for the compiled ones", RuntimeWarning, stacklevel=4)
    return False


def _missing_ops() -> List[str]:
    """The ops of `_OPS` that the loaded library does not define with those arguments."""
    missing = []
    for name, arguments in _OPS.items():
        try:
            schema = getattr(torch.ops.lazykernel, name).default._schema
        except AttributeError:
            missing.append(name)
            continue
        if tuple(argument.name for argument in schema.arguments) != arguments:
            missing.append(f"{name} (it takes other arguments)")
    return missing


def _load() -> None:
    global _LOAD_ERROR, _LOADED
    if _disabled():
        _LOAD_ERROR = f"disabled by {_DISABLE}={os.environ[_DISABLE].strip()}"
        return
    try:
        from lazykernel import _C  # noqa: F401  (loading registers the ops)
        missing = _missing_ops()
        if missing:
            raise ImportError(f"it was built from older sources and lacks the ops "
                              f"{', '.join('lazykernel::' + name for name in missing)}")
    except Exception as error:  # any failure, ImportError or an undefined symbol
        _LOAD_ERROR = f"{type(error).__name__}: {error}"
        warnings.warn(
            "lazykernel: the compiled extension lazykernel._C could not be loaded "
            f"({_LOAD_ERROR}); using the pure-PyTorch reference kernels, which are "
            "exact but slower. Rebuild with `pip install --no-build-isolation .`; "
            "`python -m lazykernel doctor` shows details.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    _LOADED = True


def has_kernel(device: torch.device) -> bool:
    """Whether a compiled kernel of the lazykernel ops exists for `device`."""
    if not _LOADED:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "lazykernel::gram_hadamard_accumulate_", key
    )


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """Which implementation of the lazykernel ops runs, and why.

    Attributes:
        name: ``"cpp"`` when the compiled library is loaded, else ``"reference"``.
        cpu_kernels: compiled CPU kernels are registered.
        cuda_kernels: compiled CUDA kernels are registered (the build had nvcc).
        cuda_devices: names of the CUDA devices torch sees (empty without a GPU).
        torch_version: the torch in use.
        reason: why this backend was chosen (the load error, if any).
    """

    name: str
    cpu_kernels: bool
    cuda_kernels: bool
    cuda_devices: List[str]
    torch_version: str
    reason: str

    def __str__(self) -> str:
        devices = ", ".join(self.cuda_devices) if self.cuda_devices else "none"
        return (
            f"lazykernel backend: {self.name}\n"
            f"  compiled CPU kernels:  {'yes' if self.cpu_kernels else 'no'}\n"
            f"  compiled CUDA kernels: {'yes' if self.cuda_kernels else 'no'}\n"
            f"  CUDA devices:          {devices}\n"
            f"  torch:                 {self.torch_version}\n"
            f"  reason:                {self.reason}"
        )


def backend() -> BackendInfo:
    """Report which backend computes the lazykernel ops and on which devices.

    Returns:
        A :class:`BackendInfo`; ``str()`` of it is a readable report.
    """
    cuda_devices = []
    if torch.cuda.is_available():
        cuda_devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cpu = has_kernel(torch.device("cpu"))
    cuda = has_kernel(torch.device("cuda"))
    if _LOADED:
        reason = "compiled extension lazykernel._C loaded"
        if not cuda:
            reason += "; built without CUDA kernels, so CUDA tensors use the reference path"
        elif not cuda_devices:
            reason += "; CUDA kernels built but no CUDA device is visible"
    else:
        reason = f"compiled extension unavailable ({_LOAD_ERROR}); reference kernels in use"
    return BackendInfo(
        name="cpp" if _LOADED else "reference",
        cpu_kernels=cpu,
        cuda_kernels=cuda,
        cuda_devices=cuda_devices,
        torch_version=torch.__version__,
        reason=reason,
    )


_load()
