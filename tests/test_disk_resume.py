"""ntk_to_disk: resume after a crash mid-run, stores that must be refused or kept, ranks, paths."""

import copy
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lazykernel
from lazykernel import _memory, disk, distributed

from conftest import functional_model_with_buffers_in_params, reference_ntk


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def _inputs(n, seed=1, dtype=torch.float64):
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _manifest(out):
    return json.loads(Path(out + ".manifest.json").read_text())


def _log_lines(out):
    return [int(line) for f in sorted(Path(out + ".tiles").glob("rank-*.log")) for line in f.read_text().split()]


class _Crash(Exception):
    pass


def _crash_after(monkeypatch, writes):
    """Make the tile writer fail on its write number ``writes + 1``, as a process killed mid-tile."""
    original = disk._TileWriter.write
    count = [0]

    def write(self, block, i, j):
        count[0] += 1
        if count[0] > writes:
            raise _Crash()
        return original(self, block, i, j)

    monkeypatch.setattr(disk._TileWriter, "write", write)
    return lambda: monkeypatch.setattr(disk._TileWriter, "write", original)


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_run_cut_between_a_tile_and_its_mirror_resumes_to_the_uninterrupted_kernel(tmp_path, monkeypatch,
                                                                                      symmetric):
    model, x1 = _mlp(), _inputs(11)
    x2 = None if symmetric else _inputs(7, seed=2)
    out = str(tmp_path / "K.npy")
    # write 3 is the mirror of the symmetric kernel's second tile: that tile was half written
    restore = _crash_after(monkeypatch, 3)
    with pytest.raises(_Crash):
        lazykernel.ntk_to_disk(model, x1, x2, out=out, output="full", batch_size=4, progress=False)
    restore()
    assert 0 < len(_log_lines(out)) < _manifest(out)["tiles"]
    # another batch size and budget: the store keeps its own
    with pytest.warns(UserWarning, match="keeps them"):
        kernel = lazykernel.ntk_to_disk(model, x1, x2, out=out, output="full", batch_size=2, memory_budget=1e9,
                                        progress=False)
    assert kernel.shape == (11, 7 if x2 is not None else 11, 3, 3) and kernel.dtype == np.float64
    assert sorted(_log_lines(out)) == list(range(_manifest(out)["tiles"]))  # each tile once
    assert np.array_equal(np.array(kernel), lazykernel.ntk(model, x1, x2, output="full", batch_size=4).numpy())
    torch.testing.assert_close(torch.from_numpy(np.array(kernel)), reference_ntk(model, x1, x2, output="full"),
                               rtol=1e-10, atol=1e-12)


def test_a_resumed_run_says_that_it_keeps_the_stores_budget_and_tiles(tmp_path, monkeypatch):
    model, x = _mlp(), _inputs(10)
    out = str(tmp_path / "K.npy")
    restore = _crash_after(monkeypatch, 1)
    with pytest.raises(_Crash):
        lazykernel.ntk_to_disk(model, x, out=out, batch_size=4, memory_budget=5e6, progress=False)
    restore()
    with pytest.warns(UserWarning, match=r"memory_budget=1000000 .*not used.*if_exists='overwrite'"):
        lazykernel.ntk_to_disk(model, x, out=out, batch_size=4, memory_budget=1e6, progress=False)
    _edit_manifest(out, complete=False)
    with pytest.warns(UserWarning, match=r"tiles of 4×4 examples.*batch_size=3 .*not used"):
        lazykernel.ntk_to_disk(model, x, out=out, batch_size=3, progress=False)
    _edit_manifest(out, complete=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings, or none: nothing to say
        lazykernel.ntk_to_disk(model, x, out=out, batch_size=4, memory_budget=5e6, progress=False)
        _edit_manifest(out, complete=False)
        again = lazykernel.ntk_to_disk(model, x, out=out, progress=False)
    torch.testing.assert_close(torch.from_numpy(np.array(again)), reference_ntk(model, x), rtol=1e-10, atol=1e-12)


def _edit_manifest(out, **fields):
    path = Path(out + ".manifest.json")
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest))


def test_a_kernel_returned_before_keeps_its_values_when_the_store_is_overwritten(tmp_path):
    model, x = _mlp(), _inputs(9)
    out = str(tmp_path / "K.npy")
    first = lazykernel.ntk_to_disk(model, x, out=out, batch_size=4, progress=False)
    values = np.array(first)
    second = lazykernel.ntk_to_disk(model, x + 1, out=out, batch_size=4, if_exists="overwrite", progress=False)
    # a smaller kernel shortened the file under the first mapping: reading it killed the process (SIGBUS)
    assert np.array_equal(np.array(first), values)
    torch.testing.assert_close(torch.from_numpy(np.array(second)), reference_ntk(model, x + 1), rtol=1e-10,
                               atol=1e-12)


def test_a_kernel_with_nan_or_inf_warns_as_ntk_does(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.fill_(1e20)
        model[1].weight.fill_(1e20)
    with pytest.warns(UserWarning, match="NaN or Inf values although the inputs and parameters are finite"):
        kernel = lazykernel.ntk_to_disk(model, torch.randn(5, 3), out=str(tmp_path / "K.npy"), progress=False)
    assert not np.isfinite(np.array(kernel)).all()


def test_buffers_in_a_functional_models_params_are_named_as_ntk_names_them(tmp_path):
    fn, params = functional_model_with_buffers_in_params()

    with pytest.raises(ValueError, match="running_mean.*keep buffers such as BatchNorm's running statistics out"):
        lazykernel.ntk_to_disk(fn, torch.randn(4, 3), params=params, out=str(tmp_path / "K.npy"), progress=False)


@pytest.mark.parametrize("first_x2, then_x2", [("none", "copy"), ("copy", "none")])
def test_x2_holding_x1s_values_continues_the_symmetric_store(tmp_path, first_x2, then_x2):
    """An x2 equal to x1 is the symmetric kernel (as in ntk): the same store, not other inputs."""
    model, x = _mlp(), _inputs(9)
    out = str(tmp_path / "K.npy")
    given = {"none": None, "copy": x.clone()}
    lazykernel.ntk_to_disk(model, x, given[first_x2], out=out, batch_size=4, progress=False)
    assert _manifest(out)["symmetric"] is True
    _edit_manifest(out, complete=False)
    again = lazykernel.ntk_to_disk(model, x, given[then_x2], out=out, batch_size=4, progress=False)
    assert sorted(_log_lines(out)) == list(range(6))  # nothing computed again
    torch.testing.assert_close(torch.from_numpy(np.array(again)), reference_ntk(model, x), rtol=1e-10, atol=1e-12)


class _SimulatedRanks:
    """The ranks of one job, run one after another in this process: rank 0 first, and
    what rank 0 broadcast is what every other rank receives."""

    def __init__(self, monkeypatch, world):
        self.world, self.rank, self.sent, self.received = world, 0, [], 0
        monkeypatch.setattr(distributed, "rank_and_world", lambda: (self.rank, self.world))
        monkeypatch.setattr(distributed, "gather_all", lambda value: [value] * self.world)
        monkeypatch.setattr(distributed, "broadcast_from_rank0", self._broadcast)
        monkeypatch.setattr(distributed, "barrier", lambda: None)

    def _broadcast(self, value):
        if self.rank == 0:
            self.sent.append(copy.deepcopy(value))
            return value
        self.received += 1
        return copy.deepcopy(self.sent[self.received - 1])

    def run(self, rank, call):
        self.rank, self.received = rank, 0
        if rank == 0:
            self.sent = []
        try:
            return call()
        except RuntimeError as error:  # the other ranks' tiles, not yet written
            assert "missing after every rank finished" in str(error)
            return None


@pytest.mark.parametrize("world", [2, 3])
def test_simulated_ranks_share_the_tiles_without_overlap_or_gap(tmp_path, monkeypatch, world):
    model, x1, x2 = _mlp(), _inputs(10), _inputs(7, seed=3)
    out = str(tmp_path / "K.npy")
    ranks = _SimulatedRanks(monkeypatch, world)

    def call():
        return lazykernel.ntk_to_disk(model, x1, x2, out=out, output="diagonal", batch_size=3, memory_budget=1e8,
                                      progress=False)

    for rank in range(world):
        ranks.run(rank, call)
    count = _manifest(out)["tiles"]
    assert count == 12 and _manifest(out)["complete"] is False
    for rank in range(world):
        logged = [int(k) for k in (Path(out + ".tiles") / f"rank-{rank}.log").read_text().split()]
        assert sorted(logged) == [k for k in range(count) if k % world == rank]
    kernel = ranks.run(0, call)  # a relaunch: rank 0 finds every tile and completes the store
    assert _manifest(out)["complete"] is True
    torch.testing.assert_close(torch.from_numpy(np.array(kernel)), reference_ntk(model, x1, x2, output="diagonal"),
                               rtol=1e-10, atol=1e-12)


def test_cpu_ranks_on_one_host_share_the_default_memory_budget(tmp_path, monkeypatch):
    """Each of 4 CPU processes of one host taking a quarter of its memory would take all of it."""
    monkeypatch.setattr(_memory, "default_memory_budget", lambda device: 8_000_000)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    ranks = _SimulatedRanks(monkeypatch, 4)
    out = str(tmp_path / "K.npy")
    ranks.run(0, lambda: lazykernel.ntk_to_disk(_mlp(), _inputs(10), out=out, batch_size=4, progress=False))
    assert _manifest(out)["memory_budget"] == 2_000_000


def test_an_out_that_names_no_file_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, x = _mlp(), _inputs(4)
    (tmp_path / "folder").mkdir()
    for out in ("", "folder", str(tmp_path / "folder") + os.sep):
        with pytest.raises(ValueError, match="out must be the path of a .npy file"):
            lazykernel.ntk_to_disk(model, x, out=out, if_exists="overwrite", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["folder"] and not os.listdir(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match=r"the folder .*missing of out=.* does not exist; create it"):
        lazykernel.ntk_to_disk(model, x, out=str(tmp_path / "missing" / "K.npy"), progress=False)


def test_a_changed_parameter_selection_is_named_by_the_parameters_that_differ(tmp_path):
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(12)], nn.Linear(4, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    out = str(tmp_path / "K.npy")
    lazykernel.ntk_to_disk(model, x, out=out, progress=False)
    with pytest.raises(ValueError, match=r"params \(only in the store: \['0.0.bias'\]; only in this call: \[\]\)"
                       ) as refused:
        lazykernel.ntk_to_disk(model, x, out=out, params=lambda name, p: name != "0.0.bias", progress=False)
    assert "11.0.weight" not in str(refused.value)


def test_a_manifest_of_another_version_or_without_its_fields_is_refused_clearly(tmp_path):
    model, x = _mlp(), _inputs(6)
    out = str(tmp_path / "K.npy")
    lazykernel.ntk_to_disk(model, x, out=out, progress=False)
    _edit_manifest(out, format="lazykernel.ntk_to_disk/2")
    with pytest.raises(ValueError, match=r"another version of lazykernel \(format lazykernel.ntk_to_disk/2;"):
        lazykernel.ntk_to_disk(model, x, out=out, progress=False)
    _edit_manifest(out, format="lazykernel.ntk_to_disk/1")
    manifest = _manifest(out)
    del manifest["tile_rows"]
    Path(out + ".manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['tile_rows'\].*if_exists='overwrite'"):
        lazykernel.ntk_to_disk(model, x, out=out, progress=False)


def test_a_process_of_a_launch_that_joined_no_process_group_is_warned(tmp_path, monkeypatch):
    """Under torchrun without init_process_group every process would compute the whole kernel into one store."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match=r"WORLD_SIZE=2 is set .*init_process_group\(\)") as caught:
        kernel = lazykernel.ntk_to_disk(_mlp(), _inputs(5), out=str(tmp_path / "K.npy"), progress=False)
    assert caught[0].filename == __file__
    torch.testing.assert_close(torch.from_numpy(np.array(kernel)), reference_ntk(_mlp(), _inputs(5)), rtol=1e-10,
                               atol=1e-12)


def test_an_interrupted_store_closes_its_progress_bar(tmp_path, monkeypatch):
    tqdm = pytest.importorskip("tqdm")
    import lazykernel.disk as disk

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(disk, "_compute_tiles", interrupted)
    open_before = {id(bar) for bar in list(tqdm.tqdm._instances)}
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    # the interrupt is kept, as an interactive session keeps the last traceback (and its frames)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        lazykernel.ntk_to_disk(model, torch.randn(6, 3), out=str(tmp_path / "k.npy"), batch_size=2,
                               progress=True)
    left_open = [bar for bar in list(tqdm.tqdm._instances) if id(bar) not in open_before]
    assert not left_open, "the interrupted store's progress bar is still open"
    assert interrupt.type is KeyboardInterrupt
