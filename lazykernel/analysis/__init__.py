"""`lazykernel.analysis`: tell lazy training from feature learning.

* :mod:`~lazykernel.analysis.metrics`: kernel distance, relative kernel change, centered
  kernel–target alignment, linear CKA (and debiased), parameter movement, linearization
  gap, NTK kernel regression and its agreement with the network;
* :class:`RegimeMonitor`: records those metrics during training and gives a verdict;
* :mod:`~lazykernel.analysis.parameterization`: MLPs/CNNs in standard, NTK and μP
  parameterization, and the α-scaled model;
* :func:`width_sweep`: the metrics across widths, with power-law fits.
"""

from lazykernel.analysis.metrics import (centered_kernel_alignment, debiased_linear_cka, kernel_distance,
                                         linear_cka, linearization_gap, ntk_regression, parameter_movement,
                                         prediction_agreement, relative_kernel_change)
from lazykernel.analysis.monitor import RegimeMonitor, Verdict
from lazykernel.analysis.parameterization import (PARAMETERIZATIONS, AlphaScaled, Scale, cnn, learning_rate,
                                                  mlp, reparameterize)
from lazykernel.analysis.sweep import SweepResult, fit_power_law, width_sweep

__all__ = [
    "AlphaScaled", "PARAMETERIZATIONS", "RegimeMonitor", "Scale", "SweepResult", "Verdict",
    "centered_kernel_alignment", "cnn", "debiased_linear_cka", "fit_power_law", "kernel_distance",
    "learning_rate", "linear_cka", "linearization_gap", "mlp", "ntk_regression", "parameter_movement",
    "prediction_agreement", "relative_kernel_change", "reparameterize", "width_sweep",
]
