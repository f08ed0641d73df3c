"""`width_sweep`: train one architecture at several widths (and α, learning rates) and
measure how the regime metrics scale."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from lazykernel.analysis import metrics
from lazykernel.analysis.monitor import RegimeMonitor
from lazykernel.analysis.parameterization import AlphaScaled, learning_rate, mlp
from lazykernel.disk import _hash_tensor
from lazykernel.ntk import ntk as empirical_ntk

__all__ = ["SweepResult", "width_sweep", "fit_power_law"]


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """Least-squares fit of ``log y = slope · log x + c``.

    Args:
        x, y: positive values, at least 3 pairs.

    Returns:
        ``(slope, standard_error)`` with the usual OLS standard error of the slope.
    """
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"need at least 3 (x, y) pairs of equal length, got {len(x)} and {len(y)}")
    if any(not (v > 0 and math.isfinite(v)) for v in list(x) + list(y)):
        raise ValueError("fit_power_law needs positive, finite x and y")
    if len(set(float(v) for v in x)) < 2:
        raise ValueError(f"fit_power_law needs at least two distinct x values, got {list(x)}")
    lx = torch.tensor([math.log(v) for v in x], dtype=torch.float64)
    ly = torch.tensor([math.log(v) for v in y], dtype=torch.float64)
    dx = lx - lx.mean()
    slope = ((dx * (ly - ly.mean())).sum() / (dx * dx).sum()).item()
    residual = ly - ly.mean() - slope * dx
    stderr = math.sqrt((residual * residual).sum().item() / (len(x) - 2) / (dx * dx).sum().item())
    return slope, stderr


@dataclass
class SweepResult:
    """What :func:`width_sweep` returns.

    Attributes:
        rows: one dict per run: its settings (``width``, ``alpha``, ``base_lr``, ``lr``,
            ``parameterization``), the last record of its monitor, ``verdict``, the final
            ``train_loss``, ``test_accuracy`` of the network and, with kernel regression,
            ``kernel_test_accuracy`` and the agreement (``kernel_relative_difference``,
            ``kernel_class_agreement``).
        histories: the monitor's table of each run, in the order of ``rows``.
    """

    rows: List[dict] = field(default_factory=list)
    histories: List[List[dict]] = field(default_factory=list)

    def fit(self, metric: str, **where) -> Tuple[float, float]:
        """Slope and standard error of ``log(metric)`` against ``log(width)`` over the rows
        matching ``where`` (e.g. ``alpha=None``)."""
        rows = [r for r in self.rows if all(r.get(k) == v for k, v in where.items())]
        return fit_power_law([r["width"] for r in rows], [r[metric] for r in rows])


def _positive_finite(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0
            and math.isfinite(value))


def _checked_widths(widths) -> List[int]:
    try:
        widths = list(widths)
    except TypeError:
        raise ValueError(f"widths must be a sequence of integers ≥ 1, got {widths!r}") from None
    if not widths:
        raise ValueError("widths must not be empty")
    bad = [w for w in widths if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1]
    if bad:
        raise ValueError(f"widths must be integers ≥ 1, got {bad} among {widths}")
    return [int(w) for w in widths]


def _accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return (outputs.argmax(1) == labels).double().mean().item()


def width_sweep(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                widths: Sequence[int], parameterization: str = "ntk", depth: int = 1,
                activation: str = "relu", alphas: Sequence[Optional[float]] = (None,),
                base_lrs: Sequence[float] = (1.0,), steps: int = 200, every: Optional[int] = None,
                probe_size: int = 64, seed: int = 0, sigma_w: float = 1.0, sigma_b: float = 0.0,
                kernel_regression: bool = True, device: str = "cpu", dtype: torch.dtype = torch.float32,
                progress=None, checkpoint: Optional[str] = None) -> SweepResult:
    """Train an MLP at each width × α × learning rate with full-batch gradient descent on
    ``L = (1/2N) Σ_i ‖f(x_i) − y_i‖²`` and a :class:`RegimeMonitor` attached.

    Every run starts from the same seed. With ``alpha`` not None the network is the
    α-scaled model :class:`AlphaScaled` trained with learning rate ``lr / α²``; the
    learning rate is :func:`learning_rate` ``(parameterization, base_lr, width)``.
    With ``kernel_regression``, the network's test predictions are compared with those of
    NTK kernel regression after the same number of gradient-descent steps
    (:func:`metrics.ntk_regression`) with one kernel shared by all outputs: the trace
    NTK at initialization divided by the number of outputs, the form ``Θ ⊗ I`` the NTK
    takes at infinite width (Jacot et al., 2018). At finite width this kernel leaves out
    the blocks between different outputs and the differences among the outputs' own
    blocks, so even a network that trains exactly as its linearization (large α)
    differs from it by an amount that only shrinks as the width grows;
    ``linearization_gap`` is the measure of laziness at a given width.

    A run stops with a ``RuntimeError`` as soon as its loss is NaN or Inf, before each
    step and after each step the monitor records.

    Args:
        train_x: ``[N, d]``; train_y: ``[N]`` integer class labels (one-hot targets are
            regressed). test_x: ``[M, d]``; test_y: ``[M]``.
        widths: hidden widths (integers ≥ 1). parameterization, depth, activation, sigma_w,
            sigma_b: as in :func:`mlp`. alphas: α values (finite, > 0; None: the plain network).
        base_lrs: learning rates (finite, > 0) before the width/α scaling. steps: GD steps
            per run (an integer ≥ 1).
        every: monitor interval (default ``steps // 10``). probe_size: probe inputs
            (the first ``probe_size`` training inputs, or all of them where there are
            fewer) and held-out inputs (the first ``probe_size`` test inputs, likewise).
            seed: initialization seed.
        device, dtype: where and in what precision to train.
        progress: a callable ``(done, total, description)`` called after each run.
        checkpoint: path of a JSON file that keeps the finished runs: each run's row and
            history are written to it (atomically) as soon as the run ends, and a call
            with the same arguments and data finds them there and trains only the runs
            that are missing, so an interrupted sweep loses at most the run it was in.
            Runs are seeded, so the rows are those of an uninterrupted sweep (on the
            same device). A file left by a sweep with other arguments or data is refused.

    Returns:
        A :class:`SweepResult`.

    Raises:
        ValueError: a bad argument, found before any run trains; a ``checkpoint`` of
            another sweep, or not a sweep's checkpoint.
        RuntimeError: a run diverged.
    """
    # every argument is checked here, before the first run trains, not when its run starts
    widths = _checked_widths(widths)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps!r}")
    for name, labels, inputs in (("train_y", train_y, train_x), ("test_y", test_y, test_x)):
        if not torch.is_tensor(labels) or labels.dim() != 1 or labels.is_floating_point() \
                or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"{name} must be [N] integer class labels, got "
                             f"{tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__}"
                             f"{' ' + str(labels.dtype) if torch.is_tensor(labels) else ''}")
        if labels.shape[0] != inputs.shape[0]:
            raise ValueError(f"{name} has {labels.shape[0]} labels for {inputs.shape[0]} inputs")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"{name} must hold class indices ≥ 0, got {int(labels.min())}")
    if not isinstance(probe_size, int) or isinstance(probe_size, bool) or not 2 <= probe_size:
        raise ValueError(f"probe_size must be an integer ≥ 2, got {probe_size!r}")
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise ValueError(f"every must be an integer ≥ 1 (or None for steps // 10), got {every!r}")
    if len(alphas) == 0 or len(base_lrs) == 0:
        raise ValueError("alphas and base_lrs must each list at least one value ((None,) for no α scaling)")
    bad = [a for a in alphas if a is not None and not _positive_finite(a)]
    if bad:
        raise ValueError(f"alphas must be finite numbers > 0 (or None for the plain network), got {bad}")
    bad = [lr for lr in base_lrs if not _positive_finite(lr)]
    if bad:
        raise ValueError(f"base_lrs must be finite numbers > 0, got {bad}")
    # plain Python numbers from here on (numpy scalars would not go into a JSON checkpoint)
    alphas = [None if a is None else float(a) for a in alphas]
    base_lrs = [float(lr) for lr in base_lrs]
    steps, probe_size = int(steps), int(probe_size)
    depth = int(depth) if isinstance(depth, numbers.Integral) and not isinstance(depth, bool) else depth
    train_y, test_y = train_y.long(), test_y.long()
    classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    every = int(every or max(1, steps // 10))
    train_x = train_x.to(device=device, dtype=dtype)
    test_x = test_x.to(device=device, dtype=dtype)
    train_y = train_y.to(device)
    test_y = test_y.to(device)
    targets = torch.nn.functional.one_hot(train_y, classes).to(dtype)
    probe_x, probe_t = train_x[:probe_size], targets[:probe_size]
    heldout = test_x[:probe_size]
    runs = list(itertools.product(widths, alphas, base_lrs))
    result = SweepResult()
    if checkpoint is not None:
        settings = dict(widths=widths, alphas=alphas, base_lrs=base_lrs,
                        parameterization=parameterization, depth=depth, activation=activation, steps=steps,
                        every=every, probe_size=probe_size, seed=seed, sigma_w=float(sigma_w),
                        sigma_b=float(sigma_b), kernel_regression=bool(kernel_regression), dtype=str(dtype),
                        data=_fingerprint(train_x, train_y, test_x, test_y))
        checkpoint = os.fspath(checkpoint)
        result = _resume(checkpoint, settings)
        for index in range(len(result.rows)):
            if progress is not None:
                progress(index + 1, len(runs), f"{parameterization} width {runs[index][0]} (from {checkpoint})")
    for index, (width, alpha, base_lr) in enumerate(runs):
        if index < len(result.rows):
            continue
        model = mlp(train_x.shape[1], width, classes, depth=depth, parameterization=parameterization,
                    activation=activation, sigma_w=sigma_w, sigma_b=sigma_b, seed=seed)
        model = model.to(device=device, dtype=dtype)
        lr = learning_rate(parameterization, base_lr, width)
        if alpha is not None:
            model = AlphaScaled(model, alpha)
            lr = model.learning_rate(lr)
        if kernel_regression:
            with torch.no_grad():
                f0_train, f0_test = model(train_x), model(test_x)
            k_train = empirical_ntk(model, train_x) / classes
            k_test = empirical_ntk(model, test_x, train_x) / classes
        monitor = RegimeMonitor(model, probe_x, probe_t, every=every, heldout_x=heldout)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)

        def diverged(step):
            return RuntimeError(f"training diverged at width {width}, alpha {alpha}, lr {lr:g} "
                                f"(step {step}); lower base_lrs")

        with monitor:
            for step in range(1, steps + 1):
                optimizer.zero_grad(set_to_none=True)
                loss = 0.5 * ((model(train_x) - targets) ** 2).sum(1).mean()
                if not torch.isfinite(loss):
                    raise diverged(step)
                loss.backward()
                optimizer.step()
                if step % every == 0 or step == steps:
                    # the monitor measures the network after this step, and the last one
                    # is the network the row reports: neither may have diverged
                    with torch.no_grad():
                        after = 0.5 * ((model(train_x) - targets) ** 2).sum(1).mean()
                    if not torch.isfinite(after):
                        raise diverged(step)
                monitor.step(step, loss=loss.item())
        row = {"parameterization": parameterization, "width": width, "alpha": alpha, "base_lr": base_lr,
               "lr": lr, "steps": steps}
        row.update({k: v for k, v in monitor.table()[-1].items() if k != "step"})
        verdict = monitor.verdict()
        row["verdict"] = verdict.label
        with torch.no_grad():
            row["train_loss"] = 0.5 * ((model(train_x) - targets) ** 2).sum(1).mean().item()
            out_test = model(test_x)
        out_test = out_test.cpu()
        row["test_accuracy"] = _accuracy(out_test, test_y.cpu())
        if kernel_regression:
            _, kr_test = metrics.ntk_regression(k_train, k_test, targets, f0_train, f0_test, lr=lr, steps=steps)
            kr_test = kr_test.cpu()
            row["kernel_test_accuracy"] = _accuracy(kr_test, test_y.cpu())
            agreement = metrics.prediction_agreement(out_test, kr_test)
            row["kernel_relative_difference"] = agreement["relative_difference"]
            row["kernel_class_agreement"] = agreement["class_agreement"]
        result.rows.append(row)
        result.histories.append(monitor.table())
        if checkpoint is not None:
            _save(checkpoint, settings, result)
        if progress is not None:
            progress(index + 1, len(runs), f"{parameterization} width {width}"
                     + ("" if alpha is None else f" alpha {alpha:g}"))
    return result


_CHECKPOINT_FORMAT = "lazykernel.width_sweep/1"


def _fingerprint(*tensors: torch.Tensor) -> str:
    """BLAKE2b of the tensors' dtypes, shapes and bytes: which data a checkpoint belongs to."""
    digest = hashlib.blake2b(digest_size=20)
    for tensor in tensors:
        _hash_tensor(digest, tensor)  # as ntk_to_disk fingerprints its inputs
    return digest.hexdigest()


def _resume(path: str, settings: dict) -> SweepResult:
    """The finished runs a checkpoint at ``path`` holds (none if there is no file yet)."""
    if not os.path.exists(path):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"the folder {folder} of checkpoint={path!r} does not exist; create it first")
        return SweepResult()
    try:
        with open(path) as handle:
            saved = json.load(handle)
        if not isinstance(saved, dict) or saved.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"its format is {saved.get('format') if isinstance(saved, dict) else None!r}")
        stored, rows, histories = saved["settings"], saved["rows"], saved["histories"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} cannot be read as a width_sweep checkpoint (format {_CHECKPOINT_FORMAT}): "
                         f"{error}; give another checkpoint path, or delete the file") from None
    differing = sorted(key for key in set(settings) | set(stored) if stored.get(key) != settings.get(key))
    if differing:
        shown = ", ".join("the data (train_x, train_y, test_x, test_y)" if key == "data"
                          else f"{key} (checkpoint {stored.get(key)!r}, this call {settings.get(key)!r})"
                          for key in differing)
        raise ValueError(f"{path} holds runs of another sweep: {shown} differ; give another checkpoint path, "
                         "or delete the file to start this sweep afresh")
    return SweepResult(rows=[dict(row) for row in rows], histories=[list(h) for h in histories])


def _save(path: str, settings: dict, result: SweepResult) -> None:
    """Write the finished runs to ``path`` through a temporary file, so that an
    interruption leaves the previous checkpoint or the new one, never half of one."""
    payload = {"format": _CHECKPOINT_FORMAT, "settings": settings, "rows": result.rows,
               "histories": result.histories}
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(payload, handle, allow_nan=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
