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


def _load() -> None:
    global _LOAD_ERROR, _LOADED
    if os.environ.get("LAZYKERNEL_DISABLE_EXTENSION", "") == "1":
        _LOAD_ERROR = "disabled by LAZYKERNEL_DISABLE_EXTENSION=1"
        return
    try:
        from lazykernel import _C  # noqa: F401  (loading registers the ops)
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
