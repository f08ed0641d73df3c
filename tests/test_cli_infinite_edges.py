"""Edge cases of lazykernel.infinite (analytic NNGP/NTK) and of the command line.

The analytic kernels are checked against the same recursion evaluated in 40-digit
arithmetic (mpmath, a dependency of torch), against closed forms of the diagonal, and
against the empirical NTK of a very wide network in NTK parameterization.
"""

import importlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import lazykernel
from lazykernel import infinite
from lazykernel.analysis import mlp
from lazykernel.cli import main as cli_main

from conftest import reference_ntk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- infinite: accuracy against an independent high-precision recursion ----------------

def _relu_kernels_high_precision(x1, x2, depth, sigma_w, sigma_b):
    """Σ^{L+1}, Θ^{L+1} of one pair by the module docstring's recursion, in 40 digits."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp.clone()
    mp.dps = 40
    sw2, sb2 = mp.mpf(sigma_w) ** 2, mp.mpf(sigma_b) ** 2
    d = len(x1)

    def dot(u, v):
        return mp.fsum(mp.mpf(p) * mp.mpf(q) for p, q in zip(u, v))

    a, b, c = sw2 * dot(x1, x1) / d + sb2, sw2 * dot(x2, x2) / d + sb2, sw2 * dot(x1, x2) / d + sb2
    theta = c
    for _ in range(depth):
        norm = mp.sqrt(a * b)
        cos = c / norm if norm > 0 else mp.mpf(0)
        angle = mp.acos(max(mp.mpf(-1), min(mp.mpf(1), cos)))
        c = sw2 * norm * (mp.sin(angle) + (mp.pi - angle) * cos) / (2 * mp.pi) + sb2
        theta = theta * sw2 * (mp.pi - angle) / (2 * mp.pi) + c
        a, b = sw2 * a / 2 + sb2, sw2 * b / 2 + sb2
    return float(c), float(theta)


def _awkward_inputs():
    """Rows of different norms, a repeated row, an opposite row, a nearly parallel one, zero."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    x[1] *= 7.0
    x[2] = -x[0]
    x[3] = x[0] * (1 + 1e-9) + 1e-8 * x[4]
    x[5] = x[4]
    x[6] = 0.0
    return x


@pytest.mark.parametrize("depth,sigma_w,sigma_b", [(1, 1.0, 0.0), (1, 1.0, 0.3), (2, 0.7, 0.0), (3, 1.3, 0.4)])
def test_relu_kernels_agree_with_a_high_precision_recursion_to_round_off(depth, sigma_w, sigma_b):
    x = _awkward_inputs()
    nngp, ntk = infinite.kernels(x, depth=depth, sigma_w=sigma_w, sigma_b=sigma_b)
    expected = torch.tensor([[_relu_kernels_high_precision(x[i].tolist(), x[j].tolist(), depth, sigma_w, sigma_b)
                              for j in range(len(x))] for i in range(len(x))], dtype=torch.float64)
    for got, want in ((nngp, expected[..., 0]), (ntk, expected[..., 1])):
        # errors measured against √(K(x, x) K(x', x')), the scale of every entry; the zero row has scale 0
        scale = (want.diagonal()[:, None] * want.diagonal()[None, :]).sqrt().clamp_min(1e-300)
        assert torch.isfinite(got).all()
        assert ((got - want).abs() / scale).max().item() < 1e-13
    assert (ntk[6] == 0).all() if sigma_b == 0 else (ntk[6] > 0).all()


def test_relu_diagonal_matches_its_closed_form_to_round_off():
    # On the diagonal the angle is 0: q' = σ_w² q/2 + σ_b², Θ' = Θ σ_w²/2 + q'.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 17, dtype=torch.float64, generator=gen) * torch.rand(40, 1, dtype=torch.float64,
                                                                            generator=gen) * 10
    sigma_w, sigma_b, depth = 1.4, 0.6, 4
    q = sigma_w ** 2 * (x * x).sum(1) / 17 + sigma_b ** 2
    theta = q.clone()
    for _ in range(depth):
        q = sigma_w ** 2 * q / 2 + sigma_b ** 2
        theta = theta * sigma_w ** 2 / 2 + q
    for second in (None, x.clone()):  # x against itself, and the same rows passed as x2
        nngp, ntk = infinite.kernels(x, second, depth=depth, sigma_w=sigma_w, sigma_b=sigma_b)
        torch.testing.assert_close(nngp.diagonal(), q, rtol=1e-13, atol=0)
        torch.testing.assert_close(ntk.diagonal(), theta, rtol=1e-13, atol=0)


def test_relu_kernels_of_nearly_parallel_inputs_keep_their_small_angle():
    # x = e1, x' at angle t = 1e-8 in d = 2, σ_w = 1, σ_b = 0, one hidden layer:
    # Θ = (cos t / 2)(π − t)/(2π) + (sin t + (π − t) cos t)/(4π)
    t = 1e-8
    x1 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    x2 = torch.tensor([[math.cos(t), math.sin(t)]], dtype=torch.float64)
    expected = 0.5 * math.cos(t) * (math.pi - t) / (2 * math.pi) + (math.sin(t) + (math.pi - t) * math.cos(t)) / (
        4 * math.pi)
    assert abs(infinite.ntk(x1, x2).item() - expected) / expected < 1e-14


def test_deep_relu_kernels_with_growing_variance_stay_finite():
    # σ_w = 3: Σ(x, x) grows like 4.5^l; after 300 layers ~1e199, and the product Σ(x,x)Σ(x',x')
    # overflows float64 although every kernel entry is representable.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    depth = 300
    nngp, ntk = infinite.kernels(x, depth=depth, sigma_w=3.0)
    q = 9.0 * (x * x).sum(1) / 3 * 4.5 ** depth
    assert torch.isfinite(nngp).all() and torch.isfinite(ntk).all()
    torch.testing.assert_close(nngp.diagonal(), q, rtol=1e-12, atol=0)
    torch.testing.assert_close(ntk.diagonal(), (depth + 1) * q, rtol=1e-12, atol=0)
    # Cauchy–Schwarz off the diagonal
    assert (ntk.abs() <= (ntk.diagonal()[:, None] * ntk.diagonal()[None, :]).sqrt() * (1 + 1e-12)).all()


def test_infinite_refuses_bad_depth_sigmas_and_inputs():
    x = torch.randn(3, 2, dtype=torch.float64)
    for depth in (2.0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="depth must be an integer ≥ 1"):
            infinite.ntk(x, depth=depth)
    assert infinite.ntk(x, depth=np.int64(2)).shape == (3, 3)
    for name, value in (("sigma_w", math.inf), ("sigma_w", math.nan), ("sigma_b", math.inf), ("sigma_b", "big")):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            infinite.ntk(x, **{name: value})
    bad = x.clone()
    bad[1, 0] = math.nan
    with pytest.raises(ValueError, match="x1 contains NaN or Inf"):
        infinite.ntk(bad)
    with pytest.raises(ValueError, match="x2 contains NaN or Inf"):
        infinite.nngp(x, torch.full((2, 2), math.inf, dtype=torch.float64))
    with pytest.raises(ValueError, match="d = 0"):
        infinite.ntk(torch.zeros(3, 0))


@pytest.mark.parametrize("activation", ["relu", "erf", "identity"])
def test_results_are_float64_on_the_inputs_device_for_any_input_dtype(activation):
    x64 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x32 = x64.float()
    nngp, ntk = infinite.kernels(x32, x32[:2], depth=2, activation=activation, sigma_b=0.2)
    assert nngp.shape == ntk.shape == (4, 2)
    assert nngp.dtype == ntk.dtype == torch.float64 and ntk.device == x32.device
    # the kernels of the float32 values, computed in float64
    torch.testing.assert_close(ntk, infinite.ntk(x32.double(), x32[:2].double(), depth=2, activation=activation,
                                                 sigma_b=0.2), rtol=1e-14, atol=0)


@pytest.mark.parametrize("sigma_b", [0.0, 0.5])
def test_very_wide_relu_network_has_the_analytic_ntk(sigma_b):
    # One hidden layer of width 16384 in NTK parameterization; inputs of different norms,
    # a zero input, x1 ≠ x2. The empirical kernel's relative Frobenius error is O(1/√width):
    # about 0.02 across seeds here; 0.06 allows three times that.
    gen = torch.Generator().manual_seed(5)
    x1 = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    x1[0] *= 5.0
    x1[1] *= 0.1
    x1[2] = 0.0
    x2 = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    exact = infinite.ntk(x1, x2, sigma_w=1.3, sigma_b=sigma_b)
    model = mlp(4, 16384, 1, parameterization="ntk", sigma_w=1.3, sigma_b=sigma_b, seed=11).double()
    empirical = lazykernel.ntk(model, x1, x2)
    assert ((empirical - exact).norm() / exact.norm()).item() < 0.06
    if sigma_b == 0.0:
        assert (empirical[2] == 0).all() and (exact[2] == 0).all()


# -- command line ---------------------------------------------------------------------

_MODELS = (
    "import torch\n"
    "def make():\n"
    "    torch.manual_seed(3)\n"
    "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))\n"
    "def make_wide(width):\n"
    "    return make()\n"
    "not_a_factory = 3\n"
)


def _reference_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edge_cli_models.py").write_text(_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((6, 4)))
    return tmp_path


def _one_line_error(args, capsys):
    code = cli_main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_model_factory_mistakes_are_one_line_errors(workdir, capsys):
    base = ["--data", "x.npy", "--out", "K.npy", "--quiet"]
    err = _one_line_error(["ntk", "--model", "edge_cli_models:make_wide"] + base, capsys)
    assert "callable without arguments" in err and "width" in err
    err = _one_line_error(["ntk", "--model", "edge_cli_models:not_a_factory"] + base, capsys)
    assert "names a int, not a function" in err
    err = _one_line_error(["ntk", "--model", ".edge_cli_models:make"] + base, capsys)
    assert "absolute module name" in err
    err = _one_line_error(["ntk", "--model", "edge_cli_models.py:make"] + base, capsys)
    assert "e.g. edge_cli_models)" in err
    assert not (workdir / "K.npy").exists()


def test_cli_reads_big_endian_npy_inputs(workdir, capsys):
    x = np.random.default_rng(1).standard_normal((5, 4))
    np.save(workdir / "big.npy", x.astype(">f8"))
    assert cli_main(["ntk", "--model", "edge_cli_models:make", "--data", "big.npy", "--out", "K.npy",
                     "--output", "full", "--dtype", "float64", "--quiet"]) == 0, capsys.readouterr().err
    kernel = np.load(workdir / "K.npy")
    assert kernel.shape == (5, 5, 2, 2) and kernel.dtype == np.float64
    torch.testing.assert_close(torch.from_numpy(kernel), reference_ntk(_reference_model(), torch.from_numpy(x),
                                                                        output="full"), rtol=1e-10, atol=1e-12)


def test_cli_refuses_a_cuda_device_index_this_machine_lacks(workdir, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    base = ["--model", "edge_cli_models:make", "--data", "x.npy", "--out", "K.npy", "--quiet"]
    err = _one_line_error(["ntk"] + base + ["--device", "cuda:3"], capsys)
    assert "there is no cuda:3; this machine has 1 CUDA device(s)" in err
    monkeypatch.setenv("LOCAL_RANK", "2")
    err = _one_line_error(["ntk"] + base + ["--device", "cuda"], capsys)
    assert "LOCAL_RANK=2" in err and "there is no cuda:2" in err
    err = _one_line_error(["demo", "--device", "cuda:1", "--out", "demo", "--no-progress"], capsys)
    assert "there is no cuda:1" in err
    assert not (workdir / "K.npy").exists() and not (workdir / "demo").exists()


def test_importing_the_main_module_runs_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr("lazykernel.cli.main", lambda argv=None: calls.append(argv) or 0)
    monkeypatch.delitem(sys.modules, "lazykernel.__main__", raising=False)
    importlib.import_module("lazykernel.__main__")  # as pydoc or a documentation build does
    assert calls == []


def test_python_m_lazykernel_prints_one_line_and_exits_non_zero(workdir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, str(workdir)]))
    done = subprocess.run([sys.executable, "-m", "lazykernel", "ntk", "--model", "edge_cli_models:make_wide",
                           "--data", "x.npy", "--out", "K.npy", "--quiet"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "lazykernel ntk: error: --model 'edge_cli_models:make_wide': the factory must be callable without "
        "arguments (missing a required argument: 'width'); wrap it in a function that takes none"]
    help_text = subprocess.run([sys.executable, "-m", "lazykernel", "ntk", "--help"], cwd=workdir, env=env,
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0
    assert "on CUDA half the device's free memory" in " ".join(help_text.stdout.split())
