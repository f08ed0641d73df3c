"""lazykernel: fast, exact empirical Neural Tangent Kernels for PyTorch.

Public API:
    ntk                       empirical NTK Gram matrix of a model
    ntk_to_disk               the same, tile by tile into a .npy file: resumable, distributed
    gram_hadamard_accumulate  the fused structured-NTK kernel
    backend                   which compiled backend is in use
"""

from lazykernel._extension import BackendInfo, backend
from lazykernel.disk import ntk_to_disk
from lazykernel.ntk import ntk
from lazykernel.ops import gram_hadamard_accumulate

__version__ = "0.1.0"

__all__ = ["BackendInfo", "backend", "gram_hadamard_accumulate", "ntk", "ntk_to_disk", "__version__"]
