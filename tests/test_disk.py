"""ntk_to_disk: values against the float64 reference, resume after SIGKILL, torch.distributed, CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lazykernel
from lazykernel.cli import main as cli_main

from conftest import SlicedPositions, reference_ntk

WORKER = str(Path(__file__).with_name("disk_worker.py"))


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def _inputs(n, seed=1, dtype=torch.float64):
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _edit_manifest(out, edit):
    """Rewrite the store's manifest through ``edit(manifest)``, as an older or interrupted run left it."""
    path = Path(out + ".manifest.json")
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("output", ["trace", "diagonal", "full"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_values_match_float64_reference(tmp_path, output, symmetric, method):
    model, x1 = _mlp(), _inputs(17)
    x2 = None if symmetric else _inputs(9, seed=2)
    kernel = lazykernel.ntk_to_disk(model, x1, x2, out=str(tmp_path / "K.npy"), output=output, method=method,
                                    batch_size=4, progress=False)
    expected = reference_ntk(model, x1, x2, output=output)
    assert kernel.shape == tuple(expected.shape)
    assert kernel.dtype == np.float64
    torch.testing.assert_close(torch.from_numpy(np.array(kernel)), expected, rtol=1e-10, atol=1e-12)
    # What is read back from the file, not a copy kept in memory.
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "K.npy")), expected, rtol=1e-10, atol=1e-12)


def test_float32_model_stores_float32_close_to_reference(tmp_path):
    model, x = _mlp(dtype=torch.float32), _inputs(13, dtype=torch.float32)
    kernel = lazykernel.ntk_to_disk(model, x, out=str(tmp_path / "K.npy"), batch_size=5, progress=False)
    assert kernel.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(np.array(kernel)).double(), reference_ntk(model, x),
                               rtol=1e-4, atol=1e-5)


def test_same_bits_as_in_memory_ntk_and_manifest_records_the_call(tmp_path):
    model, x = _mlp(), _inputs(11)
    out = tmp_path / "K.npy"
    kernel = lazykernel.ntk_to_disk(model, x, out=str(out), batch_size=3, progress=False)
    assert np.array_equal(np.array(kernel), lazykernel.ntk(model, x, batch_size=3).numpy())
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert manifest["shape"] == [11, 11] and manifest["output"] == "trace" and manifest["symmetric"]
    assert (manifest["tile_rows"], manifest["tile_cols"]) == (3, 3)
    assert manifest["tiles"] == manifest["tiles_done"] == 10  # 4 chunks: the upper triangle of 4×4
    assert manifest["complete"] is True


def test_a_different_call_is_refused_and_overwrite_replaces_it(tmp_path):
    model, x = _mlp(), _inputs(10)
    out = str(tmp_path / "K.npy")
    lazykernel.ntk_to_disk(model, x, out=out, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="parameters and buffers"):
        lazykernel.ntk_to_disk(_mlp(seed=5), x, out=out, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="inputs' values"):
        lazykernel.ntk_to_disk(model, x + 1, out=out, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="output"):
        lazykernel.ntk_to_disk(model, x, out=out, output="full", batch_size=4, progress=False)
    with pytest.raises(ValueError, match="already holds"):
        lazykernel.ntk_to_disk(model, x, out=out, if_exists="error", progress=False)
    other = lazykernel.ntk_to_disk(model, x + 1, out=out, if_exists="overwrite", batch_size=4, progress=False)
    torch.testing.assert_close(torch.from_numpy(np.array(other)), reference_ntk(model, x + 1), rtol=1e-10,
                               atol=1e-12)


def test_bad_arguments_and_foreign_files_are_refused(tmp_path):
    model, x = _mlp(), _inputs(6)
    with pytest.raises(ValueError, match="if_exists"):
        lazykernel.ntk_to_disk(model, x, out=str(tmp_path / "K.npy"), if_exists="append")
    with pytest.raises(ValueError, match="path"):
        lazykernel.ntk_to_disk(model, x, out=3)
    foreign = tmp_path / "mine.npy"
    np.save(foreign, np.ones(3))
    with pytest.raises(ValueError, match="no manifest"):
        lazykernel.ntk_to_disk(model, x, out=str(foreign), progress=False)
    assert np.array_equal(np.load(foreign), np.ones(3))  # left untouched


def test_resume_computes_only_missing_tiles(tmp_path):
    model, x = _mlp(), _inputs(12)
    out = str(tmp_path / "K.npy")
    full = lazykernel.ntk_to_disk(model, x, out=out, batch_size=4, progress=False)
    expected = np.array(full)
    log = Path(out + ".tiles") / "rank-0.log"
    # Forget tiles 2 and 5 and scribble over the file: only those tiles may be redone.
    kept = [line for line in log.read_text().split() if line not in ("2", "5")]
    log.write_text("".join(f"{k}\n" for k in kept) + "5")  # a torn last line does not count
    _edit_manifest(out, lambda manifest: manifest.update(complete=False))
    scribbled = np.load(out, mmap_mode="r+")
    scribbled[:] = -1.0
    scribbled.flush()
    del scribbled
    again = np.array(lazykernel.ntk_to_disk(model, x, out=out, progress=False))
    redone = (again != -1.0)
    # tiles row by row over the upper triangle: 0 (0,0), 1 (0,4), 2 (0,8), 3 (4,4), 4 (4,8), 5 (8,8)
    expected_redone = np.zeros_like(redone)
    for rows, cols in ((slice(0, 4), slice(8, 12)), (slice(8, 12), slice(8, 12))):
        expected_redone[rows, cols] = expected_redone[cols, rows] = True
    assert np.array_equal(redone, expected_redone)
    assert np.array_equal(again[redone], expected[redone])


def _log_lines(out):
    folder = Path(out + ".tiles")
    if not folder.is_dir():
        return []
    return [line for f in folder.glob("rank-*.log") for line in f.read_text().split("\n")[:-1]]


def _wait_for_tiles(out, count, processes, timeout=60.0):
    deadline = time.monotonic() + timeout
    while len(_log_lines(out)) < count:
        assert all(p.poll() is None for p in processes), "a worker exited before it was killed"
        assert time.monotonic() < deadline, "the worker wrote no tiles in time"
        time.sleep(0.02)


def _run_workers(out, delay, world, port=None):
    env_base = dict(os.environ)
    env_base.pop("WORLD_SIZE", None)
    processes = []
    for rank in range(world):
        env = dict(env_base)
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        processes.append(subprocess.Popen([sys.executable, WORKER, out, str(delay)], env=env,
                                          stderr=subprocess.PIPE))
    return processes


def _finish(processes, timeout=120):
    for p in processes:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err.decode()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The worker's kernel from one uninterrupted single-process run."""
    out = str(tmp_path_factory.mktemp("whole") / "K.npy")
    _finish(_run_workers(out, 0.0, 1))
    return np.load(out)


def test_sigkill_mid_run_then_rerun_is_bit_identical(tmp_path, uninterrupted):
    out = str(tmp_path / "K.npy")
    (worker,) = _run_workers(out, 0.25, 1)
    _wait_for_tiles(out, 3, [worker])
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    done_before = set(_log_lines(out))
    assert 3 <= len(done_before) < 28, "the kill must land mid-run"
    _finish(_run_workers(out, 0.0, 1))
    lines = _log_lines(out)
    assert len(lines) == len(set(lines)) == 28  # no tile written twice
    assert np.array_equal(np.load(out), uninterrupted)
    torch.manual_seed(0)  # the worker's model and inputs, to check against the float64 reference
    layers = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(40, 5)
    torch.testing.assert_close(torch.from_numpy(uninterrupted).double(), reference_ntk(layers, x),
                               rtol=1e-4, atol=1e-4)


def test_two_gloo_ranks_give_the_single_process_kernel(tmp_path, uninterrupted):
    out = str(tmp_path / "K.npy")
    _finish(_run_workers(out, 0.0, 2, _free_port()))
    assert np.array_equal(np.load(out), uninterrupted)
    per_rank = {f.name: f.read_text().split() for f in Path(out + ".tiles").glob("rank-*.log")}
    assert sorted(per_rank) == ["rank-0.log", "rank-1.log"]
    assert all(int(k) % 2 == 0 for k in per_rank["rank-0.log"])
    assert all(int(k) % 2 == 1 for k in per_rank["rank-1.log"])
    assert json.loads(Path(out + ".manifest.json").read_text())["complete"] is True


def test_killed_rank_then_relaunched_job_completes(tmp_path, uninterrupted):
    out = str(tmp_path / "K.npy")
    workers = _run_workers(out, 0.25, 2, _free_port())
    _wait_for_tiles(out, 4, workers)
    workers[1].send_signal(signal.SIGKILL)
    workers[1].wait()
    # as torchrun does when a worker dies: stop the others, then restart all
    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait()
    done_before = _log_lines(out)
    assert 4 <= len(done_before) < 28
    assert json.loads(Path(out + ".manifest.json").read_text())["complete"] is False
    _finish(_run_workers(out, 0.0, 2, _free_port()))
    lines = _log_lines(out)
    assert len(lines) == len(set(lines)) == 28  # completed tiles were not recomputed
    assert np.array_equal(np.load(out), uninterrupted)


def test_cli_writes_the_kernel_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cli_models_for_test.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(3)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x = np.random.default_rng(0).standard_normal((9, 4))
    np.save(tmp_path / "x.npy", x)
    args = ["ntk", "--model", "cli_models_for_test:make", "--data", "x.npy", "--out", "K.npy", "--output",
            "diagonal", "--dtype", "float64", "--batch-size", "4", "--memory-budget", "1GB"]
    assert cli_main(args + ["--quiet"]) == 0
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    expected = reference_ntk(model, torch.from_numpy(x), output="diagonal")
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "K.npy")), expected, rtol=1e-10, atol=1e-12)
    assert cli_main(args + ["--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli_main(args + ["--resume"]) == 0
    assert "wrote K.npy: (9, 9, 2)" in capsys.readouterr().err
    assert cli_main(args + ["--resume", "--overwrite"]) == 2
    # the precision is part of the call: the store refuses a TF32 run
    assert "precision" in _cli_error(cli_main, args + ["--resume", "--precision", "tf32"], capsys)
    with pytest.raises(SystemExit):
        cli_main(args + ["--memory-budget", "lots"])
    assert "module:factory" in _cli_error(cli_main, ["ntk", "--model", "nofactory", "--data", "x.npy", "--out",
                                                     "K2.npy"], capsys)
    (tmp_path / "bad.npy").write_text("not an array")
    for data in ("missing.npy", "bad.npy"):
        assert f"cannot read the inputs '{data}'" in _cli_error(
            cli_main, ["ntk", "--model", "cli_models_for_test:make", "--data", data, "--out", "K3.npy"], capsys)


def _cli_error(run, args, capsys):
    assert run(args) == 2
    return capsys.readouterr().err


def test_cli_reports_bad_inputs_and_options_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cli_models_bad.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Linear(4, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    np.save(tmp_path / "x.npy", np.zeros((3, 4)))
    np.savez(tmp_path / "x.npz", x=np.zeros((3, 4)))
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    base = ["ntk", "--model", "cli_models_bad:make", "--out", "K.npy", "--quiet"]
    assert "an .npz archive" in _cli_error(cli_main, base + ["--data", "x.npz"], capsys)
    assert "dtype <U1, which torch cannot hold" in _cli_error(cli_main, base + ["--data", "words.npy"], capsys)
    assert "unknown device 'foo'" in _cli_error(cli_main, base + ["--data", "x.npy", "--device", "foo"], capsys)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _cli_error(cli_main, base + ["--data", "x.npy", "--device", "cuda"],
                                                     capsys)
    # argparse's own errors: status 2 and the reason
    for option, value, reason in [("--memory-budget", "inf", "finite size of at least one byte"),
                                  ("--memory-budget", "0.5", "finite size of at least one byte"),
                                  ("--batch-size", "0", "positive integer")]:
        with pytest.raises(SystemExit) as stop:
            cli_main(base + ["--data", "x.npy", option, value])
        assert stop.value.code == 2 and reason in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli_main(["demo", "--threads", "0"])
    assert stop.value.code == 2 and "positive integer" in capsys.readouterr().err
    assert not (tmp_path / "K.npy").exists()


@pytest.mark.parametrize("spare_chunks, order", [(0.5, [0, 1, 2, 3, 4, 5]), (1.5, [0, 1, 3, 2, 4, 5]),
                                                 (9.0, [0, 1, 3, 2, 4, 5])])
def test_panels_of_rows_follow_the_spare_memory_and_keep_the_values(tmp_path, spare_chunks, order):
    from lazykernel.ntk import _setup, _tile_bytes

    model, x = _mlp(), _inputs(12)
    engine = _setup(model, x, None, "trace", "structured", None, 4, None).engine
    features = engine.features(x[:4])
    chunk_bytes = sum(t.numel() * t.element_size() for part in features for t in part)
    budget = _tile_bytes(engine, 4, 4, 8) + spare_chunks * chunk_bytes
    out = str(tmp_path / "K.npy")
    kernel = lazykernel.ntk_to_disk(model, x, out=out, method="structured", batch_size=4, memory_budget=budget,
                                    progress=False)
    # tiles 0 (0,0), 1 (0,4), 2 (0,8), 3 (4,4), 4 (4,8), 5 (8,8); a panel of two rows sweeps column 4
    # (tiles 1 and 3) before column 8 (tiles 2 and 4)
    assert [int(k) for k in (Path(out + ".tiles") / "rank-0.log").read_text().split()] == order
    torch.testing.assert_close(torch.from_numpy(np.array(kernel)), reference_ntk(model, x), rtol=1e-10,
                               atol=1e-12)


def test_precision_is_part_of_the_call_and_older_stores_mean_highest(tmp_path):
    model, x = _mlp(), _inputs(6)
    out = str(tmp_path / "K.npy")
    lazykernel.ntk_to_disk(model, x, out=out, batch_size=4, progress=False)
    assert json.loads(Path(out + ".manifest.json").read_text())["precision"] == "highest"
    with pytest.raises(ValueError, match="precision \\(store: 'highest', this call: 'tf32'\\)"):
        lazykernel.ntk_to_disk(model, x, out=out, batch_size=4, progress=False, precision="tf32")
    # a store written before the field existed continues as full precision
    _edit_manifest(out, lambda manifest: manifest.pop("precision"))
    again = lazykernel.ntk_to_disk(model, x, out=out, batch_size=4, progress=False)
    assert np.array_equal(np.array(again), lazykernel.ntk(model, x, batch_size=4).numpy())
    with pytest.raises(ValueError, match="unknown precision"):
        lazykernel.ntk_to_disk(model, x, out=str(tmp_path / "L.npy"), progress=False, precision="half")


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_complete_store_whose_data_file_was_lost_is_computed_again(tmp_path, damage):
    model, x = _mlp(), _inputs(7)
    out = tmp_path / "K.npy"
    expected = np.array(lazykernel.ntk_to_disk(model, x, out=str(out), batch_size=3, progress=False))
    if damage == "deleted":
        os.remove(out)
    else:
        with open(out, "r+b") as f:
            f.truncate(200)
    again = lazykernel.ntk_to_disk(model, x, out=str(out), batch_size=3, progress=False, if_exists="resume")
    assert np.array_equal(np.array(again), expected) and np.abs(expected).max() > 0
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert manifest["complete"] is True and manifest["tiles_done"] == manifest["tiles"]


def test_a_model_routing_examples_otherwise_than_on_the_checked_ones_is_refused_clearly(tmp_path):
    from test_structured import _Routed, routed_inputs
    torch.manual_seed(21)
    model = _Routed(guarded=False).double().eval()
    x = routed_inputs(probe_expert_only=True)
    with pytest.raises(ValueError, match="method='jacobian'"):
        lazykernel.ntk_to_disk(model, x, out=str(tmp_path / "K.npy"), progress=False)
    kernel = lazykernel.ntk_to_disk(model, x, out=str(tmp_path / "K.npy"), method="jacobian", progress=False,
                                    if_exists="overwrite")
    np.testing.assert_allclose(np.array(kernel), reference_ntk(model, x).numpy(), rtol=1e-10, atol=1e-12)


def test_a_model_with_other_layers_and_the_same_weights_is_refused(tmp_path):
    """The weights alone do not name the model: a Tanh MLP's store is not continued with ReLU."""
    out = str(tmp_path / "K.npy")
    x = _inputs(10)
    lazykernel.ntk_to_disk(_mlp(), x, out=out, batch_size=4, progress=False)
    relu = _mlp()
    relu[1] = nn.ReLU()
    with pytest.raises(ValueError, match="the model's layers"):
        lazykernel.ntk_to_disk(relu, x, out=out, batch_size=4, progress=False)
    # a store written before the field existed is continued as before
    _edit_manifest(out, lambda manifest: manifest.pop("model_structure"))
    again = lazykernel.ntk_to_disk(_mlp(), x, out=out, batch_size=4, progress=False)
    assert np.array_equal(np.array(again), lazykernel.ntk(_mlp(), x, batch_size=4).numpy())


def test_a_resumed_store_settles_its_rules_on_the_stored_tiles(tmp_path):
    torch.manual_seed(9)
    model = SlicedPositions().double()
    ids = torch.randint(0, 10, (27, 4), generator=torch.Generator().manual_seed(0))
    out = str(tmp_path / "K.npy")
    lazykernel.ntk_to_disk(model, ids, out=out, batch_size=9, progress=False)
    # as an interrupted run leaves it: the last tiles not logged, the store not complete
    log = Path(out + ".tiles") / "rank-0.log"
    log.write_text("".join(f"{k}\n" for k in log.read_text().split() if k not in ("4", "5")))
    _edit_manifest(out, lambda manifest: manifest.update(complete=False))
    again = lazykernel.ntk_to_disk(model, ids, out=out, progress=False)
    torch.testing.assert_close(torch.from_numpy(np.array(again)), reference_ntk(model, ids), rtol=1e-10,
                               atol=1e-12)


def test_a_store_whose_creation_was_cut_short_is_created_again(tmp_path):
    model, x = _mlp(), _inputs(8)
    out = str(tmp_path / "K.npy")
    lazykernel.ntk_to_disk(model, x, out=out, batch_size=4, progress=False)
    # as a crash before the manifest's rename leaves it: data, tile logs, the temporary manifest
    os.replace(out + ".manifest.json", out + ".manifest.json.tmp")
    again = lazykernel.ntk_to_disk(model, x, out=out, if_exists="resume", batch_size=4, progress=False)
    assert np.array_equal(np.array(again), lazykernel.ntk(model, x, batch_size=4).numpy())
    assert not os.path.exists(out + ".manifest.json.tmp")


def test_cli_reports_an_unwritable_path_as_an_error(tmp_path, monkeypatch, capsys):
    np.save(tmp_path / "x.npy", _inputs(4).numpy())
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "cli_models.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()\n")
    code = cli_main(["ntk", "--model", "cli_models:make", "--data", str(tmp_path / "x.npy"),
                     "--out", str(tmp_path / "file" / "K.npy")])
    assert code == 2
    assert "lazykernel ntk: error:" in capsys.readouterr().err


class _Applies(nn.Module):
    """A layer printing the function it applies, with its address in memory."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def extra_repr(self):
        return repr(self.fn)

    def forward(self, x):
        return self.fn(x)


def test_the_layers_of_a_call_do_not_depend_on_addresses_in_memory(tmp_path):
    """A process resuming a store (or another rank) prints other addresses for the same model."""
    from lazykernel.disk import _describe_call
    from lazykernel.ntk import _setup

    def layers(fn):
        model = nn.Sequential(nn.Linear(5, 4), _Applies(fn), nn.Linear(4, 2)).double()
        setup = _setup(model, _inputs(3), None, "trace", "auto", None, None, None)
        return _describe_call(setup, "auto")["model_structure"]

    first, second = (lambda x: torch.tanh(x)), (lambda x: torch.tanh(x))
    assert repr(first) != repr(second)
    assert layers(first) == layers(second)
    assert layers(first) != layers(torch.sin)
