"""`ntk_to_disk`: an empirical NTK larger than memory, written tile by tile, resumable.

Layout of a store for ``out = "K.npy"``:

* ``K.npy``: the kernel, a plain ``.npy`` file (``numpy.load(out, mmap_mode="r")``
  reads it without loading it);
* ``K.npy.manifest.json``: what was computed (shapes, dtype, output mode, method,
  tile grid, memory budget, fingerprints of the model and of the inputs) and
  whether it is complete; replaced atomically, never edited in place;
* ``K.npy.tiles/rank-R.log``: the tiles rank R has finished, one index a line,
  each appended only after the tile's bytes are on disk (``fsync``).

The tile grid is a pure function of the call and is recorded in the manifest,
so a rerun after any interruption computes exactly the tiles that are missing,
with the same arithmetic, and the result is bit-identical to an uninterrupted
run. Ranks of a ``torch.distributed`` job own tiles ``k ≡ rank (mod world)``
and each appends to its own log, so no two processes ever write the same file
region or the same log.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Mapping
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import torch

from lazykernel import _memory, distributed
from lazykernel._model import ParamSelection, explained_autograd_errors, model_tensors, one_call_per_model
from lazykernel.ntk import (_Engine, _features_bytes, _looks_finite, _setup, _tile_bytes, _tile_sizes,
                            not_finite_message)
from lazykernel.rules import RuleDoesNotApply

_FORMAT = "lazykernel.ntk_to_disk/1"
IF_EXISTS = ("resume", "overwrite", "error")
# Fields of the manifest that must agree before a store may be continued.
_CALL_FIELDS = ("shape", "dtype", "output", "method", "symmetric", "params", "model_fingerprint",
                "model_structure", "inputs_fingerprint", "precision")
# what a field added later means in a manifest written before it
_CALL_DEFAULTS = {"precision": "highest"}
# fields a manifest written before them does not record, so cannot be compared
_UNRECORDED = ("model_structure",)
# fields every manifest of this format holds
_REQUIRED = ("shape", "dtype", "symmetric", "memory_budget", "tile_rows", "tile_cols", "tiles", "complete")
_HASH_CHUNK_BYTES = 1 << 24


@one_call_per_model
def ntk_to_disk(
    model,
    x1: torch.Tensor,
    x2: Optional[torch.Tensor] = None,
    *,
    out: str,
    output: str = "trace",
    method: str = "auto",
    params: ParamSelection = None,
    batch_size: Optional[int] = None,
    memory_budget: Optional[float] = None,
    if_exists: str = "resume",
    progress: bool = True,
    precision: str = "highest",
) -> np.memmap:
    """Empirical NTK ``Θ(x1, x2) = J(x1) J(x2)ᵀ`` computed into a ``.npy`` file.

    The same kernel as `lazykernel.ntk` (Jacot, Gabriel & Hongler, 2018), for
    kernels that do not fit in memory or take long enough that an interruption
    must not lose the work. The kernel is computed in tiles sized by
    ``memory_budget`` and each tile goes to disk as soon as it is done; the
    whole kernel is never held in memory. With ``x2=None`` only tiles on and
    above the diagonal are computed, and each is written to both halves.

    Resumable: calling again with the same model, inputs and options after an
    interruption (Ctrl-C, ``kill -9``, power loss) computes only the missing
    tiles and gives a bit-identical file. A resumed run keeps the tile grid and
    memory budget recorded when the store was created (it warns when this
    call's ``memory_budget`` or ``batch_size`` asks for others).

    Distributed: inside a ``torch.distributed`` process group (e.g. launched
    with ``torchrun``, gloo on CPU, NCCL on GPU) every rank must make the same
    call with the same ``out`` on a shared file system; tile k goes to rank
    ``k mod world``, rank 0 creates the store and marks it complete. A job
    restarted after a rank died resumes like a single process does.

    Args:
        model, x1, x2, output, method, params, batch_size, precision: as for
            `lazykernel.ntk` (``x1: [N1, *in]``, ``x2: [N2, *in]``, or a model's
            several inputs as tuples or dicts of such tensors); an ``x2``
            holding exactly ``x1``'s values is the symmetric kernel of ``x2=None``
            (and its store).
        out: path of the ``.npy`` file; the manifest and the tile logs are
            written beside it (``out + ".manifest.json"``, ``out + ".tiles/"``).
        memory_budget: bytes of working memory per process (the kernel, which
            is on disk, is not counted); default a quarter of the memory
            available on the CPU, which the CPU processes of one host
            (torchrun's ``LOCAL_WORLD_SIZE``) share, or half of the free
            memory of a CUDA device.
        if_exists: what to do when ``out`` already holds a store: ``"resume"``
            (default) continues it if it was made by the same call and refuses
            it otherwise; ``"overwrite"`` discards it; ``"error"`` refuses it.
        progress: show a tqdm bar (per rank) with tiles done, kernel entries per
            second and the estimated time left.

    Returns:
        The kernel as a read-only ``numpy.memmap`` of ``out``: ``[N1, N2]``
        (trace), ``[N1, N2, O]`` (diagonal) or ``[N1, N2, O, O]`` (full), in
        float64 for a float64 model and float32 otherwise; an empty kernel,
        which cannot be mapped, as a ``numpy.ndarray``. Overwriting the store
        later leaves a returned kernel as it was.

    Raises:
        ValueError: everything `lazykernel.ntk` refuses; an unknown ``if_exists``;
            an ``out`` that names a folder rather than a file;
            ``out`` holding something that is not a store, or a store made by a
            different call (other model parameters or layers, inputs, output, method,
            parameter selection or precision), unless ``if_exists="overwrite"``; ranks of one
            job making different calls.
        OSError: ``out`` cannot be written (its folder missing, a read-only
            path, a full disk); the tiles written before are kept, and the call
            can be resumed.
        RuntimeError: tiles missing after every rank finished (a rank failed).

    Warns:
        UserWarning: as `lazykernel.ntk` does, when a tile holds NaN or Inf
            although the inputs and parameters are finite (the first such tile
            of the call, as soon as it is computed); when a resumed store keeps
            a budget or tiles other than this call's; when ``WORLD_SIZE`` says
            the process is one of a launch but it joined no process group.
    """
    with explained_autograd_errors():
        return _ntk_to_disk(model, x1, x2, out, output, method, params, batch_size, memory_budget, if_exists,
                            progress, precision)


def _ntk_to_disk(model, x1, x2, out, output, method, params, batch_size, memory_budget, if_exists, progress,
                 precision) -> np.ndarray:
    if if_exists not in IF_EXISTS:
        raise ValueError(f"unknown if_exists {if_exists!r}; expected one of {IF_EXISTS}")
    if not isinstance(out, (str, os.PathLike)):
        raise ValueError(f"out must be a path to a .npy file, got {type(out).__name__}")
    paths = _StorePaths(os.fspath(out))
    if not os.path.basename(paths.data) or os.path.isdir(paths.data):
        raise ValueError(f"out must be the path of a .npy file, got {paths.data!r}, which names a folder; "
                         f"give a file in it, e.g. {os.path.join(paths.data or '.', 'K.npy')!r}")
    rank, world = distributed.rank_and_world()
    launched = distributed.launched_without_group()
    if launched:
        warnings.warn(f"WORLD_SIZE={launched} is set (a launch by torchrun?) but this process has joined no "
                      "torch.distributed process group with the other processes of the launch: it computes every tile of the kernel itself, and the "
                      "other processes of the launch write the same store at the same time. Call "
                      "torch.distributed.init_process_group() before ntk_to_disk to share the tiles out.",
                      stacklevel=4)

    asked_budget = memory_budget
    first = next(iter(x1.values() if isinstance(x1, Mapping) else x1), None) \
        if isinstance(x1, (tuple, list, Mapping)) else x1
    if memory_budget is None and world > 1 and isinstance(first, torch.Tensor) and first.device.type == "cpu":
        # the CPU processes of one host share its memory: each takes its part of the default
        memory_budget = _memory.default_memory_budget(first.device) / distributed.processes_on_this_host()
    setup = _setup(model, x1, x2, output, method, params, batch_size, memory_budget, precision)
    call = _describe_call(setup, method)

    calls = distributed.gather_all(call)
    if any(other != call for other in calls):
        raise ValueError(
            "the ranks of this job made different calls (model parameters, inputs or options differ "
            "between ranks); seed the model identically (or load the same checkpoint) on every rank"
        )
    error = None
    manifest = None
    if rank == 0:
        try:
            manifest = _open_or_create(paths, call, setup, batch_size, if_exists)
        except (ValueError, OSError) as refused:
            if world == 1:
                raise
            # the other ranks raise it too, rather than wait for a manifest
            error = (type(refused).__name__, str(refused))
    error, manifest = distributed.broadcast_from_rank0((error, manifest))
    if error is not None:
        raise (OSError if error[0] != "ValueError" else ValueError)(error[1])
    if manifest["memory_budget"] != setup.budget:
        # The budget decides the tile grid and, for some layers, the form of
        # their rule: every rank, and every resumed run, uses the store's own.
        setup = _setup(model, x1, x2, output, method, params, batch_size, manifest["memory_budget"],
                       precision)
    if setup.engine is not None and not manifest["complete"]:
        # The store's tiles decide the largest chunk, and with it which expanded
        # parameters the forward takes (`_Engine.settle`): every rank, resumed or not.
        setup.engine.settle(max(manifest["tile_rows"], manifest["tile_cols"]))

    if not manifest["complete"]:
        if rank == 0:
            _warn_unused_settings(paths, manifest, asked_budget, batch_size)
        grid = _TileGrid(manifest)
        done = _read_done(paths, grid.count)
        mine = [k for k in range(grid.count) if k % world == rank and k not in done]
        owned = sum(1 for k in range(grid.count) if k % world == rank)
        if mine:
            bar = _TileProgress(owned, owned - len(mine), rank, world, progress)
            try:
                with setup.running():
                    _compute_tiles(setup.engine, setup.x1, setup.x2, grid, mine, paths, setup.budget, bar, rank)
            except RuleDoesNotApply as error:
                # the tiles written so far are right; the store records the method
                raise ValueError(f"{error}; on these examples the model does not use that layer as on "
                                 "the examples its rule was checked on (does it route examples?): "
                                 "compute this kernel with method='jacobian', into another file or with "
                                 "if_exists='overwrite' (this store records the method)") from error
            finally:
                # also when interrupted: a resumable run should not leave a stale bar behind
                bar.close()
        distributed.barrier()
        missing = None
        if rank == 0:
            done = _read_done(paths, grid.count)
            missing = grid.count - len(done)
            if missing == 0:
                manifest["complete"] = True
                manifest["tiles_done"] = grid.count
                _write_manifest(paths, manifest)
        missing = distributed.broadcast_from_rank0(missing)
        if missing:
            raise RuntimeError(
                f"{missing} of {manifest['tiles']} tiles of {paths.data} are missing after every rank "
                "finished; a rank failed while writing. Run the same call again to compute them."
            )
    if math.prod(manifest["shape"]) == 0:
        return np.load(paths.data)  # an empty file cannot be mapped
    return np.load(paths.data, mmap_mode="r")


# -- the store ---------------------------------------------------------------------

class _StorePaths:
    def __init__(self, data: str):
        self.data = data
        self.manifest = data + ".manifest.json"
        self.tiles = data + ".tiles"

    def log(self, rank: int) -> str:
        return os.path.join(self.tiles, f"rank-{rank}.log")


def _read_manifest(paths: _StorePaths) -> Optional[dict]:
    if not os.path.exists(paths.manifest):
        return None
    try:
        with open(paths.manifest) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as broken:
        raise ValueError(
            f"{paths.manifest} cannot be read as a lazykernel manifest ({broken}); delete it and "
            f"{paths.data}, or pass if_exists='overwrite' (--overwrite)"
        ) from broken
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if isinstance(found, str) and found.startswith(_FORMAT.split("/")[0] + "/") and found != _FORMAT:
        raise ValueError(f"{paths.manifest} was written by another version of lazykernel (format {found}; "
                         f"this one reads {_FORMAT}), so its store cannot be continued; compute the kernel "
                         "again into another `out`, or pass if_exists='overwrite' (--overwrite) to replace it")
    if found != _FORMAT:
        raise ValueError(f"{paths.manifest} is not a manifest written by lazykernel.ntk_to_disk "
                         f"(format {_FORMAT}); pass if_exists='overwrite' (--overwrite) to replace it")
    lacking = [field for field in _REQUIRED if field not in manifest]
    if lacking:
        raise ValueError(f"{paths.manifest} lacks the field(s) {lacking} that every manifest of format {_FORMAT} "
                         "holds (was it edited?), so its store cannot be continued; pass if_exists='overwrite' "
                         "(--overwrite) to compute the kernel again")
    return manifest


def _write_manifest(paths: _StorePaths, manifest: dict) -> None:
    temporary = paths.manifest + ".tmp"
    with open(temporary, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, paths.manifest)
    _fsync_directory(os.path.dirname(os.path.abspath(paths.manifest)))


def _fsync_directory(path: str) -> None:
    # Makes a rename or a new file itself durable, not only its contents.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_or_create(paths: _StorePaths, call: dict, setup, batch_size: Optional[int],
                    if_exists: str) -> dict:
    """Rank 0: the manifest to work to, after checking or (re)creating the store."""
    manifest = _read_manifest(paths) if if_exists != "overwrite" else None
    if manifest is not None:
        if if_exists == "error":
            raise ValueError(f"{paths.data} already holds a kernel store; pass if_exists='resume' "
                             "(--resume) to continue it or if_exists='overwrite' (--overwrite) to discard it")
        _check_same_call(paths, manifest, call)
        if not _data_file_intact(paths, manifest):
            # The manifest outlived its data file: nothing recorded is trustworthy,
            # and every tile is computed again.
            manifest["complete"] = manifest["tiles"] == 0
            manifest["tiles_done"] = 0
            _write_manifest(paths, manifest)
            _create_data_file(paths, manifest)
        return manifest
    folder = os.path.dirname(os.path.abspath(paths.data))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the folder {folder} of out={paths.data!r} does not exist; create it first "
                                "(os.makedirs) or give another out")
    # A store whose creation was cut short (its manifest is written last, through a
    # temporary file) holds no tile: it is created again.
    cut_short = os.path.exists(paths.manifest + ".tmp")
    if if_exists != "overwrite" and not cut_short and (os.path.exists(paths.data) or os.path.exists(paths.tiles)):
        found = paths.data if os.path.exists(paths.data) else paths.tiles
        raise ValueError(f"{found} exists but has no manifest {paths.manifest}, so it was not "
                         "written by lazykernel.ntk_to_disk; move it away or pass "
                         "if_exists='overwrite' (--overwrite)")
    n1, n2 = setup.shape[0], setup.shape[1]
    tile_rows = tile_cols = 1
    if setup.engine is not None:
        cell = math.prod(setup.shape[2:])
        tile_rows, tile_cols = _tile_sizes(setup.engine, n1, n2, setup.symmetric, cell * setup.elt,
                                           setup.budget, batch_size)
    manifest = dict(format=_FORMAT, **call, memory_budget=setup.budget, tile_rows=tile_rows,
                    tile_cols=tile_cols, complete=False)
    manifest["tiles"] = _TileGrid(manifest).count
    manifest["tiles_done"] = 0
    # The manifest's temporary file marks a creation in progress until the manifest
    # itself is in place: a creation cut short is started again, not refused.
    with open(paths.manifest + ".tmp", "w") as f:
        json.dump(manifest, f)
    if os.path.exists(paths.manifest):
        os.remove(paths.manifest)
    _create_data_file(paths, manifest)
    if manifest["tiles"] == 0:
        manifest["complete"] = True
    _write_manifest(paths, manifest)
    return manifest


def _check_same_call(paths: _StorePaths, manifest: dict, call: dict) -> None:
    stored = {field: manifest.get(field, _CALL_DEFAULTS.get(field)) for field in _CALL_FIELDS}
    differing = [field for field in _CALL_FIELDS if stored[field] != call[field]
                 and not (field in _UNRECORDED and field not in manifest)]
    if not differing:
        return
    what = {"model_fingerprint": "the model's parameters and buffers",
            "model_structure": "the model's layers (its printed form, or the function's name)",
            "inputs_fingerprint": "the inputs' values"}
    if "params" in differing:
        only_stored = sorted(set(stored["params"]) - set(call["params"]))
        only_called = sorted(set(call["params"]) - set(stored["params"]))
        what["params"] = f"params (only in the store: {_some(only_stored)}; only in this call: {_some(only_called)})"
    details = ", ".join(what.get(field, f"{field} (store: {stored[field]!r}, this call: {call[field]!r})")
                        for field in differing)
    raise ValueError(
        f"{paths.data} was made by a different call and cannot be continued: {details} differ. "
        "Use another `out`, or pass if_exists='overwrite' (--overwrite) to discard the stored kernel."
    )


def _some(names: List[str], shown: int = 8) -> str:
    """The first ``shown`` names, and how many more there are."""
    if len(names) <= shown:
        return repr(names)
    return f"{names[:shown]!r} and {len(names) - shown} more"


def _warn_unused_settings(paths: _StorePaths, manifest: dict, memory_budget: Optional[float],
                          batch_size: Optional[int]) -> None:
    """Say so when this call asks for a budget or tiles the store it continues was not made with."""
    unused = []
    if memory_budget is not None and float(memory_budget) != manifest["memory_budget"]:
        unused.append(f"memory_budget={memory_budget:.10g}")
    if batch_size is not None and batch_size < max(manifest["tile_rows"], manifest["tile_cols"]):
        unused.append(f"batch_size={batch_size}")
    if unused:
        warnings.warn(
            f"{paths.data} was created with tiles of {manifest['tile_rows']}×{manifest['tile_cols']} examples "
            f"and memory_budget={manifest['memory_budget']:.10g} bytes, and a resumed run keeps them so that "
            f"its tiles match the ones already written: {' and '.join(unused)} of this call "
            f"{'are' if len(unused) > 1 else 'is'} not used. To compute with them, pass if_exists='overwrite' "
            "(--overwrite) or give another out.", stacklevel=5)


def _create_data_file(paths: _StorePaths, manifest: dict) -> None:
    """An empty ``.npy`` of the kernel's shape (sparse on disk) and no tile logs."""
    if os.path.isdir(paths.tiles):
        for name in os.listdir(paths.tiles):
            os.remove(os.path.join(paths.tiles, name))
    os.makedirs(paths.tiles, exist_ok=True)
    # A new file, not the old one truncated: a kernel an earlier call returned maps the
    # old one, which keeps its values (and a shorter file would kill its reader, SIGBUS).
    existing = os.path.realpath(paths.data)
    if os.path.isfile(existing):
        os.remove(existing)
    kernel = np.lib.format.open_memmap(paths.data, mode="w+", dtype=np.dtype(manifest["dtype"]),
                                       shape=tuple(manifest["shape"]))
    kernel.flush()
    del kernel
    with open(paths.data, "rb+") as f:
        os.fsync(f.fileno())
    _fsync_directory(os.path.dirname(os.path.abspath(paths.data)))


def _data_file_intact(paths: _StorePaths, manifest: dict) -> bool:
    try:
        kernel = np.load(paths.data, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return tuple(kernel.shape) == tuple(manifest["shape"]) and kernel.dtype == np.dtype(manifest["dtype"])


def _read_done(paths: _StorePaths, count: int) -> Set[int]:
    """Tiles every rank has recorded as written; a torn last line does not count."""
    done: Set[int] = set()
    if not os.path.isdir(paths.tiles):
        return done
    for name in os.listdir(paths.tiles):
        if not (name.startswith("rank-") and name.endswith(".log")):
            continue
        with open(os.path.join(paths.tiles, name), "rb") as f:
            text = f.read().decode("ascii", errors="replace")
        for line in text.split("\n")[:-1]:
            if line.isdigit() and int(line) < count:
                done.add(int(line))
    return done


# -- what identifies a call ---------------------------------------------------------

def _hash_tensor(h: "hashlib._Hash", tensor: torch.Tensor) -> None:
    h.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    flat = tensor.detach().reshape(-1)
    per_chunk = max(1, _HASH_CHUNK_BYTES // max(1, flat.element_size()))
    for start in range(0, flat.numel(), per_chunk):
        piece = flat[start:start + per_chunk].cpu().contiguous()
        h.update(piece.view(torch.uint8).numpy().data)


def _describe_call(setup, method: str) -> dict:
    adapter = setup.adapter
    model_hash = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(model_tensors(adapter).items()):
        model_hash.update(name.encode() + b"\0")
        _hash_tensor(model_hash, tensor)
    inputs_hash = hashlib.blake2b(digest_size=20)
    # an x2 holding x1's values is the symmetric kernel, and its store (`_setup`)
    for x in (setup.x1, None if setup.symmetric else setup.x2):
        inputs_hash.update(b"none" if x is None else b"tensor")
        if x is not None:
            _hash_tensor(inputs_hash, x)
    if adapter.layout is not None:
        # several inputs, packed as bytes: their dtypes and shapes (`lazykernel._inputs`)
        inputs_hash.update(adapter.layout.describe().encode())
    # what the tensors do not show: the layers (their printed form: types, sizes, activations,
    # modes) or, for a functional model, the function; other code changes go unseen
    if adapter.module is not None:
        shown = f"{type(adapter.module).__module__}.{type(adapter.module).__qualname__}\n{adapter.module!r}\n" \
                f"{[m.training for m in adapter.module.modules()]}"
    else:
        fn = adapter._fn
        shown = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    # object addresses (a function in a layer's extra_repr) differ between processes and ranks
    shown = re.sub(r"0x[0-9a-fA-F]+", "0x", shown)
    structure = hashlib.blake2b(shown.encode(), digest_size=20).hexdigest()
    store_dtype = "float64" if setup.compute_dtype == torch.float64 else "float32"
    return dict(shape=list(setup.shape), dtype=store_dtype, output=setup.mode, method=method,
                symmetric=setup.symmetric, params=sorted(adapter.params),
                model_fingerprint=model_hash.hexdigest(), model_structure=structure,
                inputs_fingerprint=inputs_hash.hexdigest(), precision=setup.precision)


# -- the tiles ----------------------------------------------------------------------

class _TileGrid:
    """Tile k ↦ (row start, column start), row by row; upper triangle when symmetric."""

    def __init__(self, manifest: dict):
        self.shape = tuple(manifest["shape"])
        self.symmetric = bool(manifest["symmetric"])
        self.rows, self.cols = manifest["tile_rows"], manifest["tile_cols"]
        n1, n2 = self.shape[0], self.shape[1]
        self.tiles: List[Tuple[int, int]] = [
            (i, j) for i in range(0, n1, self.rows) for j in range(0, n2, self.cols)
            if not self.symmetric or j >= i
        ] if n1 and n2 else []
        self.count = len(self.tiles)


def _compute_tiles(engine: _Engine, x1, x2, grid: _TileGrid, todo: List[int], paths: _StorePaths,
                   budget: float, bar: "_TileProgress", rank: int) -> None:
    """Compute the tiles ``todo`` and write each one durably before recording it.

    Tiles are taken in panels of consecutive rows: the features of every row
    chunk of a panel stay in memory while the columns are swept, so a column
    chunk's features are computed once per panel instead of once per tile.
    How many rows a panel holds only changes the order of the tiles, never a
    tile's arithmetic, so it may follow the memory left over by one tile.
    """
    n1, n2 = grid.shape[0], grid.shape[1]
    cell_shape = grid.shape[2:]
    cell = math.prod(cell_shape)
    elt = torch.empty((), dtype=engine.dtype).element_size()
    by_row: Dict[int, List[Tuple[int, int]]] = {}
    for k in todo:
        i, j = grid.tiles[k]
        by_row.setdefault(i, []).append((k, j))
    row_starts = sorted(by_row)
    spare = budget - _tile_bytes(engine, grid.rows, grid.cols, cell * elt)
    _drop_torn_line(paths.log(rank))
    with open(paths.data, "rb+") as data, open(paths.log(rank), "ab") as log:
        writer = _TileWriter(data.fileno(), _read_header_end(data), n2, cell, elt, paths.data)
        cached2 = engine.features(x2) if (not grid.symmetric and grid.cols >= n2) else None
        first = row_starts[0]
        rows_features = {first: engine.features(x1[first:first + grid.rows])}
        panel_rows = 1
        if cached2 is None:
            panel_rows += int(max(0.0, spare) // max(1, _features_bytes(rows_features[first])))
        position = 0
        finite = True
        while position < len(row_starts):
            panel = row_starts[position:position + panel_rows]
            for i in panel:
                if i not in rows_features:
                    rows_features[i] = engine.features(x1[i:i + grid.rows])
            position += len(panel)
            for j in sorted({j for i in panel for _, j in by_row[i]}):
                f2 = None
                if grid.symmetric and j in rows_features:
                    f2 = rows_features[j]
                elif cached2 is not None:
                    f2 = cached2
                else:
                    f2 = engine.features(x2[j:j + grid.cols])
                for i in panel:
                    for k, column in by_row[i]:
                        if column != j:
                            continue
                        rows, cols = min(grid.rows, n1 - i), min(grid.cols, n2 - j)
                        same = grid.symmetric and i == j
                        block = torch.zeros((rows, cols) + cell_shape, dtype=engine.dtype, device=x1.device)
                        engine.block(rows_features[i], f2, same, block)
                        if finite and not _looks_finite(block, same):
                            finite = False
                            _warn_not_finite(paths, engine, i, j, rows, cols)
                        _write_tile(writer, data, log, block.cpu().numpy(), i, j, k, grid.symmetric and not same)
                        bar.update(rows * cols * (1 if same or not grid.symmetric else 2))
            rows_features = {}


def _warn_not_finite(paths: _StorePaths, engine: _Engine, i: int, j: int, rows: int, cols: int) -> None:
    # `ntk`'s warning; the run goes on, as a long one may be stopped by whoever reads it
    where = f" (first in the tile of rows {i}:{i + rows} and columns {j}:{j + cols} of {paths.data})"
    warnings.warn(not_finite_message(engine.dtype, where), stacklevel=6)


def _write_tile(writer: "_TileWriter", data, log, host: np.ndarray, i: int, j: int, k: int,
                mirror: bool) -> None:
    writer.write(host, i, j)
    if mirror:
        mirrored = host.swapaxes(0, 1)
        if host.ndim == 4:
            mirrored = mirrored.swapaxes(2, 3)
        writer.write(np.ascontiguousarray(mirrored), j, i)
    os.fsync(data.fileno())
    # Only now, with the tile's bytes durable, may the tile count as done.
    log.write(f"{k}\n".encode())
    log.flush()
    os.fsync(log.fileno())


def _drop_torn_line(log_path: str) -> None:
    """Cut a last line an interruption left without its newline, before appending after it."""
    if not os.path.exists(log_path):
        return
    with open(log_path, "rb+") as f:
        text = f.read()
        if text and not text.endswith(b"\n"):
            f.truncate(text.rfind(b"\n") + 1)
            os.fsync(f.fileno())


def _read_header_end(f) -> int:
    """Byte offset of the first element of a ``.npy`` file."""
    f.seek(0)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        np.lib.format.read_array_header_1_0(f)
    else:
        np.lib.format.read_array_header_2_0(f)
    return f.tell()


class _TileWriter:
    """Positional writes of a ``[rows, cols, *cell]`` block into the row-major file."""

    def __init__(self, fd: int, header_end: int, n2: int, cell: int, elt: int, path: str):
        self.fd, self.header_end, self.n2, self.cell, self.elt = fd, header_end, n2, cell, elt
        self.path = path

    def write(self, block: np.ndarray, i: int, j: int) -> None:
        block = np.ascontiguousarray(block)
        row_bytes = block.shape[1] * self.cell * self.elt
        view = memoryview(block.reshape(block.shape[0], -1).view(np.uint8)).cast("B")
        for r in range(block.shape[0]):
            offset = self.header_end + ((i + r) * self.n2 + j) * self.cell * self.elt
            chunk = view[r * row_bytes:(r + 1) * row_bytes]
            while chunk:
                try:
                    written = os.pwrite(self.fd, chunk, offset)
                except OSError as error:
                    raise OSError(error.errno, f"{error.strerror} while writing a tile of {self.path}; the "
                                  "tiles written before it are kept: free space (or move the store with its "
                                  "manifest and .tiles folder) and resume with if_exists='resume' (--resume)"
                                  ) from error
                chunk, offset = chunk[written:], offset + written


class _TileProgress:
    """tqdm bar over this rank's tiles, with kernel entries per second."""

    def __init__(self, total: int, initial: int, rank: int, world: int, enabled: bool):
        self._bar = None
        self._entries = 0
        self._start = time.perf_counter()
        if enabled:
            from tqdm.auto import tqdm
            desc = "ntk_to_disk" if world == 1 else f"ntk_to_disk rank {rank}/{world}"
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="tile", position=rank,
                             dynamic_ncols=True)

    def update(self, entries: int) -> None:
        self._entries += entries
        if self._bar is not None:
            rate = self._entries / max(time.perf_counter() - self._start, 1e-9)
            self._bar.set_postfix_str(f"{rate:.3g} entries/s", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
