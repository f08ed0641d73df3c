"""Backend reporting, the doctor command, and the reference fallback without _C."""

import os
import subprocess
import sys

import pytest
import torch

import lazykernel
from lazykernel.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backend_reports_compiled_cpu_kernels_when_built():
    info = lazykernel.backend()
    assert info.name in ("cpp", "reference")
    assert info.cpu_kernels == (info.name == "cpp")
    assert info.torch_version == torch.__version__
    assert isinstance(info.cuda_devices, list)
    assert f"lazykernel backend: {info.name}" in str(info)
    assert info.reason


def test_doctor_prints_backend_and_passes_self_check(capsys):
    assert main(["doctor"]) == 0
    printed = capsys.readouterr().out
    assert "lazykernel backend:" in printed
    assert "self-check (CPU op vs reference): ok" in printed


def _run_without_extension(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LAZYKERNEL_DISABLE_EXTENSION="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_without_extension_uses_reference_and_stays_exact():
    code = (
        "import torch, lazykernel\n"
        "info = lazykernel.backend()\n"
        "assert info.name == 'reference' and not info.cpu_kernels, info\n"
        "assert 'LAZYKERNEL_DISABLE_EXTENSION' in info.reason\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()\n"
        "x = torch.randn(6, 3, dtype=torch.float64)\n"
        "a = lazykernel.ntk(m, x, output='full', method='structured')\n"
        "b = lazykernel.ntk(m, x, output='full', method='jacobian')\n"
        "assert (a - b).abs().max() < 1e-12, (a - b).abs().max()\n"
        "print('ok')\n"
    )
    result = _run_without_extension(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_broken_extension_warns_once_and_falls_back(tmp_path):
    # A package copy whose _C is not a loadable library: import must still work.
    package = tmp_path / "lazykernel"
    package.mkdir()
    for name in os.listdir(os.path.join(REPO, "lazykernel")):
        if name.endswith(".py"):
            (package / name).write_text(open(os.path.join(REPO, "lazykernel", name)).read())
    (package / "_C.py").write_text("raise ImportError('undefined symbol: _ZN3c104demo')\n")
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import lazykernel\n"
        "    import lazykernel.ops\n"
        "messages = [str(w.message) for w in caught if 'lazykernel._C' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "assert 'undefined symbol' in messages[0]\n"
        "assert lazykernel.backend().name == 'reference'\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_python_dash_m_doctor_runs():
    result = subprocess.run([sys.executable, "-m", "lazykernel", "doctor"], capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "lazykernel backend:" in result.stdout


def test_doctor_without_compiled_kernels_says_the_check_is_skipped():
    env = dict(os.environ, LAZYKERNEL_DISABLE_EXTENSION="1", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-m", "lazykernel", "doctor"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "self-check (CPU op vs reference): skipped, no compiled CPU kernels" in result.stdout
    assert ": ok" not in result.stdout


def test_doctor_fails_when_the_compiled_op_disagrees(capsys, monkeypatch):
    if not lazykernel.backend().cpu_kernels:
        pytest.skip("no compiled CPU kernels to check")
    import lazykernel.ops as ops
    real = ops.gram_hadamard_accumulate

    def off_by_a_little(out, *args, **kwargs):
        real(out, *args, **kwargs)
        out[0, 0, 0, 0] += 1e-6
        return out

    monkeypatch.setattr(ops, "gram_hadamard_accumulate", off_by_a_little)
    assert main(["doctor"]) == 1
    assert "self-check (CPU op vs reference): MISMATCH (max abs difference 1.0e-06)" in capsys.readouterr().out
