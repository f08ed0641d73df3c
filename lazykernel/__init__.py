"""lazykernel: fast, exact empirical Neural Tangent Kernels for PyTorch.

Public API:
    ntk                       empirical NTK Gram matrix of a model
    ntk_to_disk               the same, tile by tile into a .npy file: resumable, distributed
    plan, NTKPlan             what ntk will do for a call: rules, forms, FLOPs, memory
    gram_hadamard_accumulate  the fused structured-NTK kernel
    backend                   which compiled backend is in use
    analysis                  regime metrics, RegimeMonitor, parameterizations, width_sweep
    infinite                  analytic infinite-width NNGP and NTK
    RegimeMonitor, width_sweep
"""

from lazykernel._extension import BackendInfo, backend
from lazykernel.disk import ntk_to_disk
from lazykernel.ntk import ntk
from lazykernel.ops import gram_hadamard_accumulate
from lazykernel.planning import NTKPlan, PlanGroup, plan
from lazykernel import analysis, infinite
from lazykernel.analysis import RegimeMonitor, width_sweep

__version__ = "0.1.0"

__all__ = ["BackendInfo", "NTKPlan", "PlanGroup", "RegimeMonitor", "analysis", "backend",
           "gram_hadamard_accumulate", "infinite", "ntk", "ntk_to_disk", "plan", "width_sweep", "__version__"]
