"""lazykernel: fast, exact empirical Neural Tangent Kernels for PyTorch.

Public API:
    ntk                       empirical NTK Gram matrix of a model
    jvp, vjp                  Jacobian-vector and vector-Jacobian products
    ntk_vp                    NTK-vector product without forming the kernel
    linearize                 the linearized network as a trainable module
    predict                   closed-form MSE training predictions (dense and CG)
    gram_hadamard_accumulate  the fused structured-NTK kernel
    linear_jvp                the fused forward + tangent kernel of a linear map
    backend                   which compiled backend is in use
"""

from lazykernel import predict
from lazykernel._extension import BackendInfo, backend
from lazykernel.linearize import LinearizedModel, linearize
from lazykernel.ntk import ntk
from lazykernel.ops import gram_hadamard_accumulate, linear_jvp
from lazykernel.products import jvp, ntk_vp, vjp

__version__ = "0.1.0"

__all__ = [
    "BackendInfo", "LinearizedModel", "backend", "gram_hadamard_accumulate", "jvp", "linear_jvp",
    "linearize", "ntk", "ntk_vp", "predict", "vjp", "__version__",
]
