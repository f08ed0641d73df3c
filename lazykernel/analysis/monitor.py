"""`RegimeMonitor`: record the regime metrics of a network while it trains, and give a verdict."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.func import jvp

from lazykernel._inputs import pack_inputs
from lazykernel._model import restoring_functional_call
from lazykernel.analysis import metrics
from lazykernel.ntk import ntk as empirical_ntk

__all__ = ["RegimeMonitor", "Verdict"]

_STATE_FORMAT = "lazykernel.RegimeMonitor/1"

# one tensor [N, *in], or a model's several inputs: a tuple or list of tensors, or a dict of them
_Inputs = Union[torch.Tensor, Sequence[torch.Tensor], Dict[str, torch.Tensor]]


@dataclass
class Verdict:
    """The regime a monitored run was in.

    Attributes:
        label: ``"lazy"``, ``"feature-learning"`` or ``"mixed"``.
        scores: the last recorded relative kernel change, linearization gap and
            parameter movement (keys as in the table).
        thresholds: ``{"lazy_below": …, "feature_learning_above": …}``.
        reason: one sentence saying which score decided.
    """

    label: str
    scores: Dict[str, float]
    thresholds: Dict[str, float]
    reason: str = field(default="")


def _alignment_targets(probe_y: torch.Tensor) -> torch.Tensor:
    """A copy of ``probe_y``; ``[P]`` integer class labels become ``[P, C]`` one-hot rows.

    ``y yᵀ`` of the label values would rate a pair of classes 2 and 3 (6) above a pair
    both of class 1 (1): the alignment needs the kernel of "same class or not".
    """
    labels = (probe_y.dim() == 1 and not probe_y.is_floating_point() and not probe_y.is_complex()
              and probe_y.dtype != torch.bool)
    if not labels:
        return probe_y.detach().clone()
    if probe_y.numel() and int(probe_y.min()) < 0:
        raise ValueError(f"probe_y holds integer class labels, which must be ≥ 0, got {int(probe_y.min())}; "
                         "pass floating-point targets for a regression")
    return nn.functional.one_hot(probe_y.long(), int(probe_y.max()) + 1).to(torch.float64)


def _examples(x: Any, name: str, letter: str) -> int:
    """How many examples ``x`` holds: one tensor, or a model's several inputs whose parts
    `pack_inputs` checks (tensors, the same number of examples, one device)."""
    packed, _ = pack_inputs(x, name)
    if not torch.is_tensor(packed) or packed.dim() < 1:
        given = "a scalar tensor" if torch.is_tensor(packed) else type(packed).__name__
        raise ValueError(f"{name} must be a [{letter}, *in] tensor, or for a model of several inputs a tuple, list "
                         f"or dict of such tensors, got {given}")
    return packed.shape[0]


def _form(x: Any) -> str:
    """What ``x`` is, as messages say it: one tensor, a tuple of parts or a dict of them."""
    if torch.is_tensor(x):
        return "one tensor"
    if isinstance(x, Mapping):
        return f"a dict with keys {sorted(x)}"
    return f"a tuple of {len(x)} tensors"


def _copied(x: Any) -> Any:
    """A copy of the inputs ``x``: a tensor, a tuple (also of a list) or a dict of tensors.
    A sequence of one tensor is that tensor, as the model gets it."""
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, Mapping):
        return {key: part.detach().clone() for key, part in x.items()}
    if len(x) == 1:
        return x[0].detach().clone()
    return tuple(part.detach().clone() for part in x)


def _moved(x: Any, device: torch.device) -> Any:
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, Mapping):
        return {key: part.to(device) for key, part in x.items()}
    return tuple(part.to(device) for part in x)


def _called(fn, x: Any):
    """``fn`` on the inputs ``x``: ``fn(x)``, ``fn(*x)`` or ``fn(**x)``."""
    if torch.is_tensor(x):
        return fn(x)
    return fn(**x) if isinstance(x, Mapping) else fn(*x)


def _last_linear(model: nn.Module) -> Optional[str]:
    names = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    return names[-1] if names else None


class RegimeMonitor:
    """Snapshot a model at initialization and measure, during training, how far it moves.

    At construction it stores θ0 (the trainable parameters), the empirical NTK of the probe
    inputs ``K0 = ntk(model, probe_x)``, the outputs ``f(θ0)`` on held-out inputs and the
    chosen hidden representations of the probe. Each record then computes, with the
    definitions of :mod:`lazykernel.analysis.metrics`:

    * ``kernel_distance`` and ``relative_kernel_change`` of the probe NTK to K0;
    * ``kernel_alignment``: centered kernel–target alignment of the NTK (with ``probe_y``);
    * ``parameter_movement`` ``‖θ − θ0‖/‖θ0‖`` and ``parameter_movement/<name>`` per tensor;
    * ``linearization_gap`` on the held-out inputs, with ``f_lin`` from one
      ``torch.func.jvp`` at θ0 along ``θ − θ0`` of the selected parameters (the
      others stay at θ0 in ``f_lin``, so their movement counts in the gap, and so
      do the buffers: ``f_lin`` uses the running statistics of θ0's BatchNorm, so
      the change of the network's own statistics during training is part of what
      the linearization does not explain);
    * ``cka/<layer>``: linear CKA of each chosen representation to its value at θ0;
    * any extra scalars passed to :meth:`step` (e.g. the loss).

    Cost per record: one NTK of the probe (``[P, P]``, P the number of probe examples),
    one JVP and one forward on the held-out inputs; keep P small (64–256) and ``every``
    large enough.

    Args:
        model: the ``nn.Module`` being trained (``model(x)``: ``[N, *in] → [N, *out]``;
            a model of several inputs is called ``model(*x)`` or ``model(**x)``).
        probe_x: ``[P, *in]`` inputs for the NTK and the representations; for a model of
            several inputs, a tuple or list of tensors (passed positionally) or a dict of
            them with string keys (passed by keyword), as :func:`lazykernel.ntk` takes
            them: every part with the P examples along its first axis.
        probe_y: ``[P]`` or ``[P, C]`` targets for the kernel alignment (optional);
            ``[P]`` integer class labels are one-hot encoded first, so that the
            target kernel ``Y = y yᵀ`` says which inputs share a class.
        every: record every this many calls of :meth:`step` (default 10).
        heldout_x: ``[M, *in]`` inputs for the linearization gap (default ``probe_x``);
            of the same form as ``probe_x`` (one tensor, or the same number of parts,
            or a dict of the same keys), every part with M examples.
        layers: names of modules (``model.named_modules()``) whose *inputs* (the first
            positional argument of their forward) are the
            representations to compare by CKA; default the input of the last
            ``nn.Linear``/``nn.Conv2d`` (the features the read-out sees); ``()`` for none.
        params: which parameters count, as in :func:`lazykernel.ntk` (default all trainable).
        ntk_output: output mode of the probe NTK (default ``"trace"``).

    ``probe_x``, ``probe_y`` and ``heldout_x`` are copied (each part of several inputs, into
    a tuple or dict of the monitor's own): a training loop that later changes its data in
    place, or puts other tensors in its list or dict, does not change what is measured.

    Use as ``monitor.step(step, loss=…)`` after each optimizer step, or as a context
    manager (``with RegimeMonitor(...) as monitor:``), which records the final state on
    exit. :meth:`table` returns the records, :meth:`save_csv`/:meth:`save_json` write them,
    and :meth:`verdict` classifies the run. :meth:`state_dict`/:meth:`load_state_dict`
    carry the monitor across a checkpointed and resumed training run. A record of a network whose parameters,
    held-out outputs or probe NTK hold NaN or Inf raises a ``RuntimeError`` (training
    diverged) and stores nothing.
    """

    def __init__(self, model: nn.Module, probe_x: _Inputs, probe_y: Optional[torch.Tensor] = None, *,
                 every: int = 10, heldout_x: Optional[_Inputs] = None,
                 layers: Optional[Sequence[str]] = None, params=None, ntk_output: str = "trace"):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an integer ≥ 1, got {every!r}")
        count = _examples(probe_x, "probe_x", "P")
        if count < 2:
            raise ValueError(f"probe_x must hold P ≥ 2 examples (along the first axis of each of its tensors) "
                             f"for a kernel to compare, got {count}")
        if probe_y is not None and (not torch.is_tensor(probe_y) or probe_y.dim() < 1
                                    or probe_y.shape[0] != count):
            if not torch.is_tensor(probe_y):
                given = type(probe_y).__name__
            else:
                given = "a scalar" if probe_y.dim() < 1 else f"{probe_y.shape[0]}"
            raise ValueError(f"probe_y must have one row per probe example (P = {count}), got {given}; pass "
                             "a [P] or [P, C] tensor of the probe's targets")
        self.model = model
        # copies: K0 and f0 belong to these values, whatever the caller does to its tensors
        self.probe_x = _copied(probe_x)
        self.probe_y = None if probe_y is None else _alignment_targets(probe_y)
        if heldout_x is None:
            self.heldout_x = self.probe_x
        else:
            _examples(heldout_x, "heldout_x", "M")
            self.heldout_x = _copied(heldout_x)
            if _form(self.heldout_x) != _form(self.probe_x):
                raise ValueError(f"heldout_x must hold the same parts as probe_x: probe_x is "
                                 f"{_form(self.probe_x)}, heldout_x is {_form(self.heldout_x)}; the model "
                                 "is called with both")
        self.every = every
        self._params = params
        self._output = ntk_output
        modules = dict(model.named_modules())
        if layers is None:
            last = _last_linear(model)
            layers = () if last is None else (last,)
        for name in layers:
            if name not in modules:
                raise ValueError(f"layer {name!r} is not a module of the model; names are "
                                 f"{[n for n in modules if n][:20]}")
        self.layers = tuple(layers)
        self._modules = modules
        self._names = self._selected_names()
        self._calls = 0
        self._records: List[dict] = []
        self._last_step: Optional[int] = None
        self._seen_step: Optional[int] = None
        with self._evaluating():
            self.theta0 = {n: p.detach().clone() for n, p in self._current().items()}
            # the parameters not selected, at θ0 too: f_lin moves only the selected ones
            self._others0 = {n: p.detach().clone() for n, p in model.named_parameters()
                             if n not in self.theta0}
            # buffers (BatchNorm's running statistics) are part of the function at θ0
            self._buffers0 = {n: b.detach().clone() for n, b in model.named_buffers()}
            self.k0 = empirical_ntk(model, self.probe_x, output=ntk_output, params=params)
            if self.probe_y is not None and self.k0.dim() == 2:
                try:
                    metrics.centered_kernel_alignment(self.k0, self.probe_y)
                except ValueError as error:
                    raise ValueError(f"probe_y cannot give a kernel alignment ({error}): are all its "
                                     "targets equal? Use probe inputs of several classes") from error
            self.f0 = self._outputs(self.heldout_x)
            self.representations0 = self._representations()

    # -- snapshots -----------------------------------------------------------------
    def _selected_names(self) -> List[str]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self._params is None:
            chosen = named
        elif callable(self._params):
            chosen = [(n, p) for n, p in named if self._params(n, p)]
        else:
            wanted = {self._params} if isinstance(self._params, str) else set(self._params)
            unknown = sorted(wanted - {n for n, _ in self.model.named_parameters()})
            if unknown:
                raise ValueError(f"unknown parameter name(s) {unknown}; the model's are "
                                 f"{[n for n, _ in self.model.named_parameters()][:20]}")
            chosen = [(n, p) for n, p in named if n in wanted]
        if not chosen:
            raise ValueError("no trainable parameters selected")
        return [n for n, _ in chosen]

    def _current(self) -> Dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self._names}

    class _Evaluating:
        def __init__(self, model):
            self.model = model

        def __enter__(self):
            # each module's own flag: a BatchNorm frozen in eval mode while the rest
            # trains must stay frozen afterwards
            self.modes = [(module, module.training) for module in self.model.modules()]
            self.model.eval()

        def __exit__(self, *exc):
            for module, training in self.modes:
                module.training = training

    def _evaluating(self):
        # ntk() refuses training-mode BatchNorm/Dropout, and measurements should not see them.
        return RegimeMonitor._Evaluating(self.model)

    def _outputs(self, x: _Inputs) -> torch.Tensor:
        with torch.no_grad():
            return _called(self.model, x).detach().clone()

    def _representations(self) -> Dict[str, torch.Tensor]:
        captured: Dict[str, torch.Tensor] = {}
        handles = []
        for name in self.layers:
            def hook(module, args, kwargs, name=name):
                if not args:
                    raise ValueError(f"layer {name!r} receives its inputs by keyword only ({sorted(kwargs)}), so "
                                     "it has no one input to compare by CKA; name a module whose first positional "
                                     "input is the representation (layers=...)")
                captured[name] = args[0].detach().clone()
            handles.append(self._modules[name].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                _called(self.model, self.probe_x)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def _linearized(self, current: Dict[str, torch.Tensor]) -> torch.Tensor:
        tangent = {n: (current[n].detach() - self.theta0[n]) for n in self._names}
        # several inputs go through torch.func as one packed tensor and the layout of its parts
        heldout, layout = pack_inputs(self.heldout_x, "heldout_x")

        def f(values):
            return restoring_functional_call(self.model, {**self._buffers0, **self._others0, **values},
                                             heldout, layout)

        with torch.no_grad():
            f0, df = jvp(f, (self.theta0,), (tangent,))
        return f0 + df

    # -- recording -----------------------------------------------------------------
    def step(self, step: Optional[int] = None, **extra: float) -> Optional[dict]:
        """Count one optimizer step; record when the step number is a multiple of ``every``.

        Args:
            step: the step number (default: the number of calls so far, starting at 1).
            extra: scalars to store in the record (e.g. ``loss=…``).

        Returns:
            The new record, or None when this step is not recorded.
        """
        self._calls += 1
        step = self._calls if step is None else int(step)
        self._seen_step = step
        if step % self.every != 0:
            return None
        return self.record(step, **extra)

    def record(self, step: int, **extra: float) -> dict:
        """Measure now and append a record ``{"step": step, metric: value, …}``; returns it.

        Raises:
            RuntimeError: the parameters, the outputs on the held-out inputs or the NTK of
                the probe hold NaN or Inf values (training diverged); nothing is recorded.
            ValueError: parameters among the selected ones were frozen or unfrozen since
                the monitor was built, so the NTK would cover other parameters than K0.
        """
        selected = self._selected_names()
        if selected != self._names:
            frozen = [n for n in self._names if n not in selected]
            added = [n for n in selected if n not in self._names]
            raise ValueError(
                f"the parameters the NTK is taken over changed since the monitor was built (no longer "
                f"trainable: {frozen}; newly trainable: {added}), so K0 and the kernel now would not "
                "be comparable; build the RegimeMonitor after freezing or unfreezing parameters, or "
                "pass params= naming the ones that stay trainable")
        with self._evaluating():
            current = self._current()
            for name, value in current.items():
                self._refuse_diverged(step, f"parameter {name!r}", value)
            f = self._outputs(self.heldout_x)
            self._refuse_diverged(step, "the output on the held-out inputs", f)
            k1 = empirical_ntk(self.model, self.probe_x, output=self._output, params=self._params)
            self._refuse_diverged(step, "the NTK of the probe inputs", k1)
            row = {"step": int(step)}
            row["kernel_distance"] = metrics.kernel_distance(self.k0, k1)
            row["relative_kernel_change"] = metrics.relative_kernel_change(self.k0, k1)
            if self.probe_y is not None and k1.dim() == 2:
                row["kernel_alignment"] = metrics.centered_kernel_alignment(k1, self.probe_y)
            overall, per_tensor = metrics.parameter_movement(self.theta0, current)
            row["parameter_movement"] = overall
            for name, value in per_tensor.items():
                row[f"parameter_movement/{name}"] = value
            row["linearization_gap"] = metrics.linearization_gap(f, self._linearized(current), self.f0)
            for name, rep in self._representations().items():
                row[f"cka/{name}"] = metrics.linear_cka(self.representations0[name], rep)
        for key, value in extra.items():
            row[key] = float(value.item() if torch.is_tensor(value) else value)
        self._records.append(row)
        self._last_step = int(step)
        return row

    @staticmethod
    def _refuse_diverged(step: int, what: str, value: torch.Tensor) -> None:
        if not bool(torch.isfinite(value.detach()).all()):
            raise RuntimeError(f"training diverged by step {step}: {what} holds NaN or Inf values, so no "
                               "metric can be measured; lower the learning rate (nothing was recorded)")

    def __enter__(self) -> "RegimeMonitor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._seen_step is not None and self._last_step != self._seen_step:
            self.record(self._seen_step)

    # -- checkpoints ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the monitor measures against, and what it has recorded, for a
        training run that is checkpointed and resumed.

        The snapshot at initialization (θ0 with the unselected parameters and the
        buffers at that point, K0, f0, the initial representations), the probe and
        held-out inputs and the alignment targets, the records and the step counters;
        tensors as they are held (save with ``torch.save`` beside the model and the
        optimizer). :meth:`load_state_dict` restores it into a monitor of the resumed model.
        """
        def copies(tensors):
            return {name: t.detach().clone() for name, t in tensors.items()}

        return {
            "format": _STATE_FORMAT,
            "names": list(self._names), "layers": list(self.layers), "ntk_output": self._output,
            "every": self.every,
            "theta0": copies(self.theta0), "others0": copies(self._others0), "buffers0": copies(self._buffers0),
            "k0": self.k0.detach().clone(), "f0": self.f0.detach().clone(),
            "representations0": copies(self.representations0),
            "probe_x": _copied(self.probe_x), "heldout_x": _copied(self.heldout_x),
            "heldout_is_probe": self.heldout_x is self.probe_x,
            "probe_y": None if self.probe_y is None else self.probe_y.clone(),
            "records": self.table(), "calls": self._calls, "last_step": self._last_step,
            "seen_step": self._seen_step,
        }

    def load_state_dict(self, state: dict) -> None:
        """Go on from a :meth:`state_dict` saved by the monitor of an earlier run.

        Build the monitor on the resumed model with the same ``layers``, ``params`` and
        ``ntk_output`` (its own snapshot at construction is then replaced), and load the
        state: the metrics are again measured against the run's initialization, on the
        probe and held-out inputs and with the ``every`` saved, and new records follow
        the saved ones. Tensors are moved to the device of the model's parameters.

        Raises:
            ValueError: ``state`` is not a monitor's state, or was saved for other
                parameters (names, shapes or dtype), layers or output mode.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state is not a RegimeMonitor.state_dict() (format {_STATE_FORMAT}), got "
                             f"{found!r}")
        if state["names"] != self._names:
            only_saved = [n for n in state["names"] if n not in self._names]
            only_here = [n for n in self._names if n not in state["names"]]
            raise ValueError(f"the state was saved for other parameters (only in the state: {only_saved}; "
                             f"only in this monitor: {only_here}); build the monitor with the params and "
                             "requires_grad flags of the run that saved it")
        current = self._current()
        shapes = [n for n in self._names if tuple(state["theta0"][n].shape) != tuple(current[n].shape)]
        if shapes:
            raise ValueError(f"the state's θ0 has other shapes than the model's parameters {shapes} "
                             f"(e.g. {tuple(state['theta0'][shapes[0]].shape)} against "
                             f"{tuple(current[shapes[0]].shape)}): was it saved for another model?")
        dtypes = [n for n in self._names if state["theta0"][n].dtype != current[n].dtype]
        if dtypes:
            raise ValueError(f"the state was saved for a {state['theta0'][dtypes[0]].dtype} model and this "
                             f"model's parameters are {current[dtypes[0]].dtype} ({dtypes[0]!r}): the kernels "
                             "and outputs to compare with were computed in the other dtype; convert the model "
                             "to the dtype of the run that saved the state")
        if list(state["layers"]) != list(self.layers) or state["ntk_output"] != self._output:
            raise ValueError(f"the state was saved with layers={state['layers']} and "
                             f"ntk_output={state['ntk_output']!r}, this monitor has layers={list(self.layers)} and "
                             f"ntk_output={self._output!r}; build it with the same ones")
        device = current[self._names[0]].device

        def moved(tensors):
            return {name: t.detach().to(device) for name, t in tensors.items()}

        self.theta0, self._others0, self._buffers0 = (moved(state[key]) for key in ("theta0", "others0",
                                                                                   "buffers0"))
        self.k0, self.f0 = state["k0"].to(device), state["f0"].to(device)
        self.representations0 = moved(state["representations0"])
        self.probe_x = _moved(state["probe_x"], device)
        self.heldout_x = self.probe_x if state["heldout_is_probe"] else _moved(state["heldout_x"], device)
        self.probe_y = None if state["probe_y"] is None else state["probe_y"].to(device)
        self.every = int(state["every"])
        self._records = [dict(row) for row in state["records"]]
        self._calls = int(state["calls"])
        self._last_step, self._seen_step = state["last_step"], state["seen_step"]

    # -- results -------------------------------------------------------------------
    def table(self) -> List[dict]:
        """The records so far, oldest first: a list of dicts (copies)."""
        return [dict(row) for row in self._records]

    def save_csv(self, path: str) -> None:
        """Write the records to ``path`` as CSV, one row per record (union of the columns)."""
        columns: List[str] = []
        for row in self._records:
            columns.extend(k for k in row if k not in columns)
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self._records)

    def save_json(self, path: str) -> None:
        """Write ``{"records": [...], "verdict": {...}}`` to ``path`` (the verdict if any record)."""
        payload = {"records": self.table()}
        if self._records:
            v = self.verdict()
            payload["verdict"] = {"label": v.label, "scores": v.scores, "thresholds": v.thresholds,
                                  "reason": v.reason}
        with open(path, "w") as handle:
            json.dump(payload, handle, indent=2, allow_nan=True)

    def verdict(self, lazy_below: float = 0.1, feature_learning_above: float = 0.3) -> Verdict:
        """Classify the run from its last record.

        The score is the larger of the relative kernel change ``‖K_t − K0‖_F/‖K0‖_F`` and the
        linearization gap: both are 0 for a model that trains exactly as its linearization
        (Jacot et al., 2018; Lee et al., 2019) and of order one when the features move.
        ``lazy`` if the score is below ``lazy_below`` (default 0.1: the kernel and outputs
        stay within 10 % of the linear model), ``feature-learning`` if it is above
        ``feature_learning_above`` (default 0.3), ``mixed`` in between.

        Raises:
            RuntimeError: nothing recorded yet.
        """
        if not 0 < lazy_below <= feature_learning_above:
            raise ValueError(f"need 0 < lazy_below ≤ feature_learning_above, got {lazy_below}, "
                             f"{feature_learning_above}")
        if not self._records:
            raise RuntimeError("no record yet: call monitor.step(...) or monitor.record(step) first")
        last = self._records[-1]
        scores = {k: last[k] for k in ("relative_kernel_change", "linearization_gap", "parameter_movement")}
        gap = scores["linearization_gap"]
        candidates = {"relative kernel change": scores["relative_kernel_change"]}
        if not math.isnan(gap):
            candidates["linearization gap"] = gap
        decider = max(candidates, key=candidates.get)
        score = candidates[decider]
        if score < lazy_below:
            label = "lazy"
        elif score > feature_learning_above:
            label = "feature-learning"
        else:
            label = "mixed"
        thresholds = {"lazy_below": lazy_below, "feature_learning_above": feature_learning_above}
        reason = f"{decider} {score:.3g} at step {last['step']}"
        return Verdict(label, scores, thresholds, reason)
