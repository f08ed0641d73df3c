"""lazykernel: fast, exact empirical Neural Tangent Kernels for PyTorch.

Public API:
    ntk                       empirical NTK Gram matrix of a model
    ntk_to_disk               the same, tile by tile into a .npy file: resumable, distributed
    plan, NTKPlan             what ntk will do for a call: rules, forms, FLOPs, memory
    jvp, vjp                  Jacobian-vector and vector-Jacobian products
    ntk_vp                    NTK-vector product without forming the kernel
    linearize                 the linearized network as a trainable module
    predict                   closed-form MSE training predictions (dense and CG)
    gram_hadamard_accumulate  the fused structured-NTK kernel
    linear_jvp                the fused forward + tangent kernel of a linear map
    backend                   which compiled backend is in use
    analysis                  regime metrics, RegimeMonitor, parameterizations, width_sweep
    infinite                  analytic infinite-width NNGP and NTK
    RegimeMonitor, width_sweep
"""

from lazykernel import predict
from lazykernel._extension import BackendInfo, backend
from lazykernel.disk import ntk_to_disk
from lazykernel.linearize import LinearizedModel, linearize
from lazykernel.ntk import ntk
from lazykernel.ops import gram_hadamard_accumulate, linear_jvp
from lazykernel.planning import NTKPlan, PlanGroup, plan
from lazykernel.products import jvp, ntk_vp, vjp
from lazykernel import analysis, infinite
from lazykernel.analysis import RegimeMonitor, width_sweep

__version__ = "0.1.0"

__all__ = [
    "BackendInfo", "LinearizedModel", "NTKPlan", "PlanGroup", "RegimeMonitor", "analysis", "backend",
    "gram_hadamard_accumulate", "infinite", "jvp", "linear_jvp", "linearize", "ntk", "ntk_to_disk", "ntk_vp",
    "plan", "predict", "vjp", "width_sweep", "__version__",
]
