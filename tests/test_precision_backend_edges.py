"""Edges of the precision option, the backend loader and the distributed helpers.

PyTorch's float32 precision settings come in two APIs that must agree (the
legacy ``allow_tf32`` switches and ``set_float32_matmul_precision``, and the
per-backend ``fp32_precision`` settings): a call must work whichever the caller
used, take the precision it was asked for, and leave every setting as it was.
"""

import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import lazykernel
from lazykernel import _extension, distributed
from lazykernel._precision import gemm_gram_accumulate, matmul_precision

from conftest import OUTPUTS, explicit_gram_hadamard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")

# -- the precision switches ------------------------------------------------------

# (backend, op) of every fp32_precision setting a call could change, and their parents
_SETTINGS = (("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"), ("mkldnn", "matmul"),
             ("cuda", "all"), ("mkldnn", "all"))


def _get(backend, op):
    return torch._C._get_fp32_precision_getter(backend, op)


def _readable(read):
    try:
        return read()
    except RuntimeError:
        return "refused"


def _readers():
    """What a caller's code reads through the legacy API (PyTorch refuses mixed settings)."""
    return {
        "get_float32_matmul_precision": _readable(torch.get_float32_matmul_precision),
        "cuda.matmul.allow_tf32": _readable(lambda: torch.backends.cuda.matmul.allow_tf32),
        "cudnn.allow_tf32": _readable(lambda: torch.backends.cudnn.allow_tf32),
    }


def _switches():
    """Every setting as the caller sees it, also once the generic setting changes: a
    setting that defers to the generic one follows it, one set of its own does not."""
    seen = {"readers": _readers(), "settings": {s: _get(*s) for s in _SETTINGS}}
    generic = _get("generic", "all")
    try:
        for value in ("ieee", "tf32"):
            torch._C._set_fp32_precision_setter("generic", "all", value)
            seen[f"with generic {value}"] = {s: _get(*s) for s in _SETTINGS}
    finally:
        torch._C._set_fp32_precision_setter("generic", "all", generic)
    return seen


@pytest.fixture(autouse=True)
def _default_switches():
    """Each test starts from, and leaves, PyTorch's settings as a fresh process has them, but
    for cuDNN's, which hold an explicit "tf32" (their initial default cannot be written)."""
    def reset():
        for backend in ("generic", "cuda", "mkldnn"):
            torch._C._set_fp32_precision_setter(backend, "all", "none")
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True
        for backend, op in (("cuda", "matmul"), ("mkldnn", "matmul")):
            torch._C._set_fp32_precision_setter(backend, op, "none")

    reset()
    yield
    reset()


def _generic_tf32_after_legacy():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.fp32_precision = "tf32"


CALLER_SETTINGS = {
    "defaults": lambda: None,
    "matmul_precision_high": lambda: torch.set_float32_matmul_precision("high"),
    "matmul_precision_medium": lambda: torch.set_float32_matmul_precision("medium"),
    "new_api_cuda_matmul_tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "new_api_generic_tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
    "legacy_on_then_generic_tf32": _generic_tf32_after_legacy,
    "legacy_cudnn_off": lambda: setattr(torch.backends.cudnn, "allow_tf32", False),
    "new_api_conv_ieee": lambda: setattr(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
}


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("precision", ["highest", "tf32"])
@pytest.mark.parametrize("caller", list(CALLER_SETTINGS))
def test_a_cuda_call_takes_its_precision_and_leaves_the_callers_settings(caller, precision, raises):
    CALLER_SETTINGS[caller]()
    before = _switches()
    inside = {}
    with pytest.raises(RuntimeError, match="inside the model") if raises else contextlib.nullcontext():
        with matmul_precision(precision, CUDA, torch.float32):
            inside = {"settings": {s: _get(*s) for s in _SETTINGS[:3]}, "readers": _readers()}
            if raises:
                raise RuntimeError("inside the model")
    # cuBLAS matmuls and cuDNN convolutions and RNNs take TF32 exactly when the call asks for it ...
    tf32 = precision == "tf32"
    assert {s: value == "tf32" for s, value in inside["settings"].items()} == dict.fromkeys(_SETTINGS[:3], tf32)
    # ... what the caller could read, code inside the call can read, and it tells the truth ...
    expected = {"get_float32_matmul_precision": "high" if tf32 else "highest",
                "cuda.matmul.allow_tf32": tf32, "cudnn.allow_tf32": tf32}
    for reader, value in before["readers"].items():
        if value != "refused":
            assert inside["readers"][reader] == expected[reader], reader
    # ... and afterwards every setting is as the caller left it
    assert _switches() == before


def test_nested_calls_give_the_outer_call_its_precision_back():
    torch.set_float32_matmul_precision("medium")
    before = _switches()
    with matmul_precision("tf32", CUDA, torch.float32):
        outer = _switches()
        with matmul_precision("highest", CUDA, torch.float32):
            assert _get("cuda", "matmul") != "tf32" and _get("cuda", "conv") != "tf32"
        assert _switches() == outer
        assert _get("cuda", "matmul") == _get("cuda", "conv") == "tf32"
    assert _switches() == before
    assert torch.get_float32_matmul_precision() == "medium"


# a fresh process: cuDNN's settings hold their initial default, which defers to a
# generic setting made later (and no setter can write back)
_FRESH_PROCESS_CALLS = """
import torch
from lazykernel._precision import matmul_precision
get, put = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
cuda = torch.device("cuda")

def cudnn_under_generic_ieee():
    put("generic", "all", "ieee")
    seen = (get("cuda", "conv"), get("cuda", "rnn"))
    put("generic", "all", "none")
    return seen

assert cudnn_under_generic_ieee() == ("ieee", "ieee")
with matmul_precision("tf32", cuda, torch.float32):
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
print("after tf32:", cudnn_under_generic_ieee())
with matmul_precision("highest", cuda, torch.float32):
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
print("after highest:", torch.backends.cudnn.allow_tf32, get("cuda", "conv"), get("cuda", "rnn"),
      torch.get_float32_matmul_precision())
"""


def test_a_tf32_call_in_a_fresh_process_leaves_cudnns_initial_default():
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_CALLS], env=env, capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    # a call that needs no change writes nothing, so cuDNN still follows a later generic setting;
    # after "highest" (which must switch cuDNN off) it allows TF32 again, the closest PyTorch can write
    assert result.stdout.splitlines() == ["after tf32: ('ieee', 'ieee')", "after highest: True tf32 tf32 highest"]


# -- gemm_gram_accumulate -------------------------------------------------------------

def _strided(shape, generator):
    """A float64 tensor of ``shape`` that is a non-contiguous view."""
    base = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator, dtype=torch.float64)
    return base[..., ::2]


def _result_shape(n1, n2, o, output):
    return {"trace": (n1, n2), "diagonal": (n1, n2, o), "full": (n1, n2, o, o)}[output]


@pytest.mark.parametrize("n1, n2", [(0, 3), (4, 0), (5, 3)])
@pytest.mark.parametrize("output", OUTPUTS)
def test_gemm_gram_on_empty_and_strided_operands_matches_the_float64_reference(output, n1, n2):
    gen = torch.Generator().manual_seed(7)
    o = 3
    ks, ds = (4, 6), (2, 5)
    a1 = [_strided((n1, 1, k), gen) for k in ks]
    a2 = [_strided((n2, 1, k), gen) for k in ks]
    g1 = [_strided((n1, 1, o, d), gen) for d in ds]
    g2 = [_strided((n2, 1, o, d), gen) for d in ds]
    assert not any(t.is_contiguous() for t in a1 + a2 + g1 + g2 if t.numel())
    start = torch.randn(_result_shape(n1, n2, o, output), generator=gen, dtype=torch.float64)
    got = gemm_gram_accumulate(start.clone(), a1, a2, g1, g2, output)
    want = start + explicit_gram_hadamard(a1, a2, g1, g2, output)
    assert got.shape == _result_shape(n1, n2, o, output)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("operand", ["a2", "g1", "g2"])
def test_gemm_gram_refuses_a_term_whose_operands_have_several_positions(operand):
    gen = torch.Generator().manual_seed(8)
    shapes = {"a1": (4, 1, 3), "a2": (5, 1, 3), "g1": (4, 1, 2, 6), "g2": (5, 1, 2, 6)}
    shapes[operand] = shapes[operand][:1] + (2,) + shapes[operand][2:]
    terms = {name: [torch.randn(shape, generator=gen, dtype=torch.float64)] for name, shape in shapes.items()}
    out = torch.zeros(4, 5, dtype=torch.float64)
    # a position axis of 2 in any operand is named, never read as its first position
    with pytest.raises(ValueError, match=rf"single-position.*{operand} \[{', '.join(map(str, shapes[operand]))}\]"):
        gemm_gram_accumulate(out, terms["a1"], terms["a2"], terms["g1"], terms["g2"], "trace")
    assert torch.equal(out, torch.zeros(4, 5, dtype=torch.float64))


# -- the backend -----------------------------------------------------------------------

def _package_copy(tmp_path):
    """A copy of the Python package without its compiled library."""
    package = tmp_path / "lazykernel"
    shutil.copytree(os.path.join(REPO, "lazykernel"), package,
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    return package


# an extension built from older sources: it defines the first op only
_STALE_EXTENSION = '''
import torch
_library = torch.library.Library("lazykernel", "DEF")
_library.define("gram_hadamard_accumulate_(Tensor(a!) out, Tensor[] a1, Tensor[] a2, Tensor[] g1, "
                "Tensor[] g2, str output, bool symmetric) -> ()")
'''


def test_an_extension_that_lacks_an_op_is_reported_and_the_package_still_imports(tmp_path):
    package = _package_copy(tmp_path)
    (package / "_C.py").write_text(_STALE_EXTENSION)
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, lazykernel\n"
        "messages = [str(w.message) for w in caught if 'lazykernel._C' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "print(messages[0])\n"
        "info = lazykernel.backend()\n"
        "assert info.name == 'reference' and not info.cpu_kernels, info\n"
        "print(info.reason)\n"
        "m = torch.nn.Linear(3, 2).double()\n"
        "x = torch.randn(4, 3, dtype=torch.float64)\n"
        "y, y_dot = lazykernel.linear_jvp(x, None, m.weight, torch.ones_like(m.weight), m.bias)\n"
        "assert torch.allclose(y_dot, x @ torch.ones(2, 3, dtype=torch.float64).T)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("LAZYKERNEL_DISABLE_EXTENSION", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    warning, reason, ok = result.stdout.strip().splitlines()
    assert "linear_jvp" in warning and "rebuild" in warning.lower(), warning
    assert "linear_jvp" in reason, reason
    assert ok == "ok"


@pytest.fixture
def reload_extension(monkeypatch):
    """Run the loader again (under the test's environment); the loaded state is put back after."""
    monkeypatch.setattr(_extension, "_LOADED", False)
    monkeypatch.setattr(_extension, "_LOAD_ERROR", None)

    def load():
        _extension._load()
        return _extension._LOADED, _extension._LOAD_ERROR

    return load


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", " 1 "])
def test_the_usual_spellings_of_true_disable_the_extension(value, monkeypatch, reload_extension):
    monkeypatch.setenv("LAZYKERNEL_DISABLE_EXTENSION", value)
    loaded, error = reload_extension()
    assert not loaded
    assert "LAZYKERNEL_DISABLE_EXTENSION" in error
    assert lazykernel.backend().name == "reference"


@pytest.mark.parametrize("value", ["", "0", "false", "No", "off"])
def test_the_usual_spellings_of_false_keep_the_extension(value, monkeypatch, reload_extension):
    monkeypatch.setenv("LAZYKERNEL_DISABLE_EXTENSION", value)
    assert reload_extension() == (True, None)


def test_an_unknown_value_of_the_disable_switch_is_named_in_a_warning(monkeypatch, reload_extension):
    monkeypatch.setenv("LAZYKERNEL_DISABLE_EXTENSION", "please")
    with pytest.warns(RuntimeWarning, match=r"LAZYKERNEL_DISABLE_EXTENSION='please'.*1 to use the reference"):
        assert reload_extension() == (True, None)


# -- distributed helpers -----------------------------------------------------------------

@pytest.fixture
def launch(monkeypatch):
    """A torchrun-like environment; joining the group is recorded instead of done."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29511")
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.append(kwargs))

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        return joined

    return set_env


@pytest.mark.parametrize("rank", ["2", "-1", "x", None])
def test_joining_refuses_a_rank_that_is_not_one_of_the_world(rank, launch):
    joined = launch(WORLD_SIZE="2", **({} if rank is None else {"RANK": rank}))
    # a rank outside 0..WORLD_SIZE-1 would wait for a rendezvous that never completes
    with pytest.raises(ValueError, match="RANK=") as refused:
        distributed.init_from_environment(torch.device("cpu"))
    assert "WORLD_SIZE=2" in str(refused.value) and "0 to 1" in str(refused.value)
    assert joined == []


def test_joining_with_a_valid_rank_joins_with_gloo_on_the_cpu(launch):
    joined = launch(WORLD_SIZE="2", RANK="1")
    assert distributed.init_from_environment(torch.device("cpu")) is True
    assert joined == [{"backend": "gloo"}]


@pytest.mark.parametrize("world", ["two", "1.5"])
def test_a_world_size_that_is_not_an_integer_is_named(world, launch):
    joined = launch(WORLD_SIZE=world, RANK="0")
    with pytest.raises(ValueError, match=rf"WORLD_SIZE={world!r} .*not an integer"):
        distributed.init_from_environment(torch.device("cpu"))
    assert joined == []


def test_an_empty_world_size_is_one_process(launch):
    joined = launch(WORLD_SIZE="", RANK="")
    assert distributed.init_from_environment(torch.device("cpu")) is False
    assert distributed.launched_without_group() == 0
    assert joined == []
