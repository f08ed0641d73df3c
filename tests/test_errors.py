"""ntk() input validation: every documented error is a ValueError naming its cause."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import lazykernel
from conftest import METHODS, assert_close_to_reference, functional_model_with_buffers_in_params, reference_ntk


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def _x(n, *shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64).to(dtype)


class MeanPool(nn.Module):
    """Accepts [N, T, 4] for any T (so x1 and x2 may differ in T)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x).mean(1)


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("method", METHODS)
def test_x1_shape_rejected_by_model_names_x1(method):
    with pytest.raises(ValueError, match=r"(?i)x1"):
        lazykernel.ntk(_mlp(), _x(5, 4), _x(3, 3), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_x2_shape_rejected_by_model_names_x2(method):
    # A model accepting x1 but rejecting x2 necessarily sees a different trailing
    # shape; the message must still say that x2 is the culprit.
    with pytest.raises(ValueError, match=r"(?i)x2"):
        lazykernel.ntk(_mlp(), _x(5, 3), _x(3, 4), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_different_trailing_shapes_accepted_by_model_raise_trailing(method):
    torch.manual_seed(0)
    model = MeanPool()
    x1, x2 = _x(5, 3, 4), _x(3, 2, 4)
    model(x1), model(x2)  # the model itself accepts both
    with pytest.raises(ValueError, match=r"(?i)trailing"):
        lazykernel.ntk(model, x1, x2, method=method)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_and_inputs_on_different_devices_raise_device():
    model = _mlp().cuda()
    with pytest.raises(ValueError, match=r"(?i)device"):
        lazykernel.ntk(model, _x(5, 3), _x(3, 3))


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize(
    "model_dtype,input_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)], ids=str
)
def test_floating_x1_dtype_differing_from_model_raises_dtype(model_dtype, input_dtype):
    with pytest.raises(ValueError, match=r"(?i)dtype"):
        lazykernel.ntk(_mlp(model_dtype), _x(5, 3, dtype=input_dtype))


def test_floating_x2_dtype_differing_from_model_raises_dtype():
    with pytest.raises(ValueError, match=r"(?i)dtype"):
        lazykernel.ntk(_mlp(torch.float32), _x(5, 3), _x(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("method", METHODS)
def test_integer_token_ids_are_accepted_for_embedding_model(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    ids1 = torch.randint(0, 10, (5, 3))
    ids2 = torch.randint(0, 10, (3, 3))
    result = lazykernel.ntk(model, ids1, ids2, method=method)
    assert result.shape == (5, 3) and result.dtype == torch.float32
    torch.testing.assert_close(result.double(), reference_ntk(model, ids1, ids2, "trace", None),
                               rtol=0, atol=1e-4 * result.abs().max().item())


# ------------------------------------------------------------------ parameters


def _all_frozen():
    model = _mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, None


def _named_only_frozen():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    return model, ["0.weight", "2.weight"]  # the biases stay trainable but are not selected


NO_PARAM_CASES = {
    "all_frozen": _all_frozen,
    "empty_name_list": lambda: (_mlp(), []),
    "predicate_selects_none": lambda: (_mlp(), lambda name, p: False),
    "named_only_frozen": _named_only_frozen,
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(NO_PARAM_CASES))
def test_no_selected_trainable_parameter_raises(case, method):
    model, params = NO_PARAM_CASES[case]()
    with pytest.raises(ValueError, match=r"(?i)no trainable parameters"):
        lazykernel.ntk(model, _x(5, 3), _x(3, 3), method=method, params=params)


def test_functional_params_dict_without_floating_entry_raises_no_trainable_parameters():
    def fn(p, x):
        return x[:, :2] * p["k"]

    with pytest.raises(ValueError, match=r"(?i)no trainable parameters"):
        lazykernel.ntk(fn, _x(5, 3), params={"k": torch.tensor(2)})


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("bad", ["sum", "mean", "trace_", ""])
def test_unknown_output_raises_output(bad):
    with pytest.raises(ValueError, match=r"(?i)output"):
        lazykernel.ntk(_mlp(), _x(5, 3), output=bad)


@pytest.mark.parametrize("bad", ["vjp", "exact", ""])
def test_unknown_method_raises_method(bad):
    with pytest.raises(ValueError, match=r"(?i)method"):
        lazykernel.ntk(_mlp(), _x(5, 3), method=bad)


@pytest.mark.parametrize("method", METHODS)
def test_memory_budget_too_small_for_one_example_raises_memory_budget(method):
    with pytest.raises(ValueError, match=r"(?i)memory_budget"):
        lazykernel.ntk(_mlp(), _x(5, 3), _x(3, 3), method=method, memory_budget=16)


# ------------------------------------------------------------------ train mode


def _with_batchnorm():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def _with_dropout(p):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Dropout(p), nn.Linear(6, 2))


@pytest.mark.parametrize("method", METHODS)
def test_batchnorm_in_training_mode_raises_eval(method):
    model = _with_batchnorm().train()
    with pytest.raises(ValueError, match=r"(?i)eval\(\)"):
        lazykernel.ntk(model, _x(5, 3), _x(3, 3), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_batchnorm_without_running_statistics_is_refused_in_eval_mode(method):
    # with running_mean/running_var set to None, eval mode still uses batch statistics
    model = _with_batchnorm().eval()
    model[1].running_mean = model[1].running_var = None
    with pytest.raises(ValueError, match="no running statistics"):
        lazykernel.ntk(model, _x(5, 3), _x(3, 3), method=method)


class _Coupled(nn.Module):
    """Statistics over the batch axis: each example's output depends on the others."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.hidden, self.out = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        h = h - h.mean(0, keepdim=True) if self.kind == "centred" else torch.softmax(h, dim=0)
        return self.out(h)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["centred", "softmax"])
def test_a_model_that_mixes_examples_is_refused(kind, method):
    torch.manual_seed(5)
    model = _Coupled(kind)
    with pytest.raises(ValueError, match="depends on the other examples"):
        lazykernel.ntk(model, _x(5, 3), _x(3, 3), method=method)
    with pytest.raises(ValueError, match="depends on the other examples"):
        lazykernel.jvp(model, _x(5, 3), [torch.zeros_like(p) for p in model.parameters()])


class _Centred(nn.Module):
    """f(θ) − f(θ0) at θ a hair from θ0: outputs at the round-off of the values inside."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 4))
        self.start = copy.deepcopy(self.net).requires_grad_(False)
        with torch.no_grad():
            for p in self.net.parameters():
                p.add_(1e-8 * torch.randn_like(p))

    def forward(self, x):
        return self.net(x) - self.start(x)


def test_outputs_that_are_small_differences_of_large_terms_are_not_taken_for_coupling():
    # float32 round-off differs between a batch and a single example, and follows
    # the values inside the model, not the outputs
    torch.manual_seed(0)
    model = _Centred().eval()
    x = torch.randn(6, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel = lazykernel.ntk(model, x, params=lambda name, p: name.startswith("net.2."))
    assert kernel.shape == (6, 6) and bool(torch.isfinite(kernel).all())


@pytest.mark.parametrize("method", METHODS)
def test_active_dropout_in_training_mode_raises_eval(method):
    model = _with_dropout(0.5).train()
    with pytest.raises(ValueError, match=r"(?i)eval\(\)"):
        lazykernel.ntk(model, _x(5, 3), _x(3, 3), method=method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("build", [_with_batchnorm, lambda: _with_dropout(0.5)], ids=["batchnorm", "dropout"])
def test_same_models_after_eval_work_and_match_reference(build, method):
    model = build().eval()
    x1, x2 = _x(5, 3), _x(3, 3, seed=1)
    result = lazykernel.ntk(model, x1, x2, method=method)
    ref = reference_ntk(model, x1, x2, "trace", None)
    torch.testing.assert_close(result.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("method", METHODS)
def test_dropout_p0_in_training_mode_is_accepted(method):
    model = _with_dropout(0.0).train()
    x1, x2 = _x(5, 3), _x(3, 3, seed=1)
    result = lazykernel.ntk(model, x1, x2, method=method)
    ref = reference_ntk(model, x1, x2, "trace", None)
    torch.testing.assert_close(result.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


# ------------------------------------------------------------------ non-finite


def _poison(x, value, index=(1, 2)):
    x = x.clone()
    x[index] = value
    return x


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_x1_raises_naming_x1(method, value):
    with pytest.raises(ValueError, match=r"(?i)NaN or Inf") as info:
        lazykernel.ntk(_mlp(), _poison(_x(5, 3), value), _x(3, 3), method=method)
    assert "x1" in str(info.value)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_x2_raises_naming_x2(method, value):
    with pytest.raises(ValueError, match=r"(?i)NaN or Inf") as info:
        lazykernel.ntk(_mlp(), _x(5, 3), _poison(_x(3, 3), value), method=method)
    assert "x2" in str(info.value)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_parameter_raises_naming_the_parameter(method, value):
    model = _mlp()
    with torch.no_grad():
        model[2].bias[1] = value
    with pytest.raises(ValueError, match=r"(?i)NaN or Inf") as info:
        lazykernel.ntk(model, _x(5, 3), _x(3, 3), method=method)
    assert "2.bias" in str(info.value)


def test_nonfinite_first_weight_raises_naming_0_weight():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"(?is)NaN or Inf.*0\.weight|0\.weight.*NaN or Inf"):
        lazykernel.ntk(model, _x(5, 3))


@pytest.mark.parametrize("method", ["structured", "jacobian", "ntvp"])
def test_empty_inputs_give_an_empty_kernel(method):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(4, 3)
    assert lazykernel.ntk(model, x[:0], method=method).shape == (0, 0)
    assert lazykernel.ntk(model, x[:0], x, output="full", method=method).shape == (0, 4, 2, 2)


@pytest.mark.parametrize("kwargs, phrase", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"memory_budget": -1}, "memory_budget"),
    ({"memory_budget": "8GB"}, "memory_budget"),
])
def test_bad_batch_size_or_memory_budget_values_raise(kwargs, phrase):
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=phrase):
        lazykernel.ntk(model, torch.randn(2, 3), **kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("inference", [False, True])
def test_a_model_that_writes_into_its_input_is_refused_and_the_input_kept(method, inference):
    # LeakyReLU in place on the raw input: each forward would shrink the negative inputs again
    # (inside inference mode too, where the probe's copy must still count writes)
    model = nn.Sequential(nn.LeakyReLU(0.2, inplace=True), nn.Linear(3, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    before = x.clone()
    with torch.inference_mode(inference):
        with pytest.raises(ValueError, match="changed its input in place.*x1.*inplace=False"):
            lazykernel.ntk(model, x, method=method)
        assert torch.equal(x, before)
        with pytest.raises(ValueError, match="changed its input in place"):
            lazykernel.jvp(model, x, {name: torch.ones_like(p) for name, p in model.named_parameters()})
        assert torch.equal(x, before)
    # an in-place activation after the first layer writes into the model's own tensors: fine
    model = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2, inplace=True), nn.Linear(4, 2)).double()
    assert_close_to_reference(lazykernel.ntk(model, x, method=method), reference_ntk(model, x), torch.float64)
    assert torch.equal(x, before)


def test_a_model_that_detaches_its_input_in_place_is_refused_by_the_probe():
    # the probe's copy is seen through a view, as the chunks of x1 are
    class Detaching(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x.detach_())

    with pytest.raises(ValueError, match="could not be applied to x1.*detach"):
        lazykernel.ntk(Detaching(), torch.randn(5, 3))


@pytest.mark.parametrize("method", METHODS)
def test_recurrent_dropout_in_training_mode_raises_eval(method):
    torch.manual_seed(15)
    gru = nn.GRU(3, 4, num_layers=2, dropout=0.5, batch_first=True)

    class LastState(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = gru

        def forward(self, x):
            return self.gru(x)[0][:, -1]

    model = LastState().train()
    with pytest.raises(ValueError, match=r"'gru' \(GRU, dropout=0.5\).*eval\(\)"):
        lazykernel.ntk(model, torch.randn(4, 5, 3), method=method)
    # one layer: the dropout argument does nothing
    single = nn.GRU(3, 4, batch_first=True).train()
    assert lazykernel.ntk(lambda p, x: torch.func.functional_call(single, p, (x,))[0][:, -1], torch.randn(4, 5, 3),
                          params=dict(single.named_parameters()), method=method).shape == (4, 4)


@pytest.mark.parametrize("method", METHODS)
def test_a_model_with_integer_outputs_is_refused_by_name(method):
    class Argmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return self.lin(x).argmax(1)

    with pytest.raises(ValueError, match="returns torch.int64 outputs.*before any argmax"):
        lazykernel.ntk(Argmax(), torch.randn(5, 8), method=method)


def test_one_example_without_its_batch_axis_gets_a_hint():
    with pytest.raises(ValueError, match=r"x1 must be \[N, \*in\].*x1.unsqueeze\(0\)"):
        lazykernel.ntk(_mlp(), torch.randn(5))  # read as five examples of no features
    with pytest.raises(ValueError, match=r"x1 must be \[N, \*in\].*x1.unsqueeze\(0\)"):
        lazykernel.ntk(nn.Linear(8, 2), torch.randn(8))


@pytest.mark.parametrize("method", METHODS)
def test_buffers_in_a_functional_models_params_are_named_as_the_problem(method):
    fn, params = functional_model_with_buffers_in_params()

    with pytest.raises(ValueError, match="running_mean.*keep buffers such as BatchNorm's running statistics out"):
        lazykernel.ntk(fn, torch.randn(4, 3), params=params, method=method)
    with pytest.raises(ValueError, match="keep buffers"):
        lazykernel.plan(fn, torch.randn(4, 3), params=params, method=method)


def test_a_kernel_that_overflows_warns():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.fill_(1e20)
        model[1].weight.fill_(1e20)
    with pytest.warns(UserWarning, match="NaN or Inf values although the inputs and parameters are finite") as caught:
        kernel = lazykernel.ntk(model, torch.ones(2, 3))
    assert not bool(torch.isfinite(kernel).all())
    assert caught[0].filename == __file__
    # one example alone overflows: its own entry Θ(x, x), not its products with the others
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    x = torch.ones(4, 3)
    x[2] = 1e25
    other = x.clone()
    other[0] += 1.0  # other examples than x1's, so that the kernel is not symmetric
    for x2 in (None, other):  # the symmetric kernel's diagonal, and one sum otherwise
        with pytest.warns(UserWarning, match="NaN or Inf values.*try float64"):
            lazykernel.ntk(model, x, x2)
    # in float64 there is no wider dtype to suggest
    with pytest.warns(UserWarning, match="NaN or Inf values") as caught:
        lazykernel.ntk(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)).double(),
                       torch.full((2, 3), 1e200, dtype=torch.float64))
    assert "float64, or" not in str(caught[0].message) and "smaller weights or inputs" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lazykernel.ntk(model, torch.ones(4, 3), output="full")
