"""lazykernel: fast, exact empirical Neural Tangent Kernels for PyTorch.

Public API:
    ntk                       empirical NTK Gram matrix of a model
    plan, NTKPlan             what ntk will do for a call: rules, forms, FLOPs, memory
    gram_hadamard_accumulate  the fused structured-NTK kernel
    backend                   which compiled backend is in use
"""

from lazykernel._extension import BackendInfo, backend
from lazykernel.ntk import ntk
from lazykernel.ops import gram_hadamard_accumulate
from lazykernel.planning import NTKPlan, PlanGroup, plan

__version__ = "0.1.0"

__all__ = ["BackendInfo", "NTKPlan", "PlanGroup", "backend", "gram_hadamard_accumulate", "ntk", "plan",
           "__version__"]
