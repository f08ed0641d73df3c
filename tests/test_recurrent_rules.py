"""Rules for nn.RNN, nn.GRU, nn.LSTM and their cells, against explicit float64 Jacobians."""

import pytest
import torch
from torch import nn

import lazykernel
from conftest import reference_ntk

KINDS = {"rnn": nn.RNN, "rnn_relu": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def _assert_exact(got, want):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


def _rules(model, x, **options):
    return [group.rule for group in lazykernel.plan(model, x, **options).groups]


class _Sequence(nn.Module):
    """A recurrent layer on ``[N, T, 3]`` read at its last step and at its final state."""

    def __init__(self, kind, layers=1, bidirectional=False, batch_first=True, bias=True, dropout=0.0):
        super().__init__()
        options = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias,
                       dropout=dropout)
        if kind == "rnn_relu":
            options["nonlinearity"] = "relu"
        self.rnn = KINDS[kind](3, 4, **options)
        width = 4 * (2 if bidirectional else 1)
        self.head = nn.Linear(width + 4, 3)

    def forward(self, x):
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        y, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        last = (y if self.rnn.batch_first else y.transpose(0, 1))[:, -1]
        return self.head(torch.cat([last, h[-1]], dim=1))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layers, bidirectional, batch_first, bias", [
    (1, False, True, True), (2, True, False, True), (2, False, True, False), (1, True, True, True)])
def test_recurrent_layer_rules_match_the_reference(kind, layers, bidirectional, batch_first, bias):
    torch.manual_seed(0)
    model = _Sequence(kind, layers, bidirectional, batch_first, bias, dropout=0.25).double().eval()
    x1 = torch.randn(5, 6, 3, dtype=torch.float64)
    x2 = torch.randn(3, 6, 3, dtype=torch.float64)
    rule = type(model.rnn).__name__ + "Rule"
    assert _rules(model, x1) == [rule, "LinearRule"]
    for output in ("trace", "diagonal", "full"):
        want = reference_ntk(model, x1, x2, output=output)
        for method in ("structured", "auto"):
            _assert_exact(lazykernel.ntk(model, x1, x2, output=output, method=method), want)
    # chunks of two examples, symmetric
    _assert_exact(lazykernel.ntk(model, x1, output="full", batch_size=2), reference_ntk(model, x1, output="full"))


class _Stateful(nn.Module):
    """The initial state comes from the input (an encoder of its mean), and the layer runs twice."""

    def __init__(self, kind):
        super().__init__()
        self.lstm = kind == "lstm"
        self.rnn = KINDS[kind](3, 4, batch_first=True, num_layers=2)
        self.init = nn.Linear(3, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h0 = torch.tanh(self.init(x.mean(1))).reshape(-1, 2, 4).transpose(0, 1).contiguous()   # [2, N, 4]
        state = (h0, torch.zeros_like(h0)) if self.lstm else h0
        first, state = self.rnn(x, state)
        second, _ = self.rnn(x.flip(1) * 0.5, state)
        return self.head(torch.cat([first[:, -1], second[:, 0]], dim=1))


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
def test_recurrent_layer_with_an_initial_state_and_two_calls(kind):
    torch.manual_seed(1)
    model = _Stateful(kind).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    assert type(model.rnn).__name__ + "Rule" in _rules(model, x)
    _assert_exact(lazykernel.ntk(model, x, output="full"), reference_ntk(model, x, output="full"))


@pytest.mark.parametrize("select", [["rnn.weight_hh_l0"], ["rnn.bias_ih_l0", "head.weight"],
                                    ["rnn.weight_ih_l1_reverse", "rnn.bias_hh_l0"]])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_recurrent_layer_with_some_parameters_selected(kind, select):
    torch.manual_seed(2)
    model = _Sequence(kind, layers=2, bidirectional=True).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    got = lazykernel.ntk(model, x, output="full", params=select)
    _assert_exact(got, reference_ntk(model, x, output="full", params_selection=select))


class _Unrolled(nn.Module):
    """A cell stepped over ``[N, T, 3]`` by the model itself, starting from no state."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


@pytest.mark.parametrize("cell", [lambda: nn.RNNCell(3, 4), lambda: nn.RNNCell(3, 4, nonlinearity="relu"),
                                  lambda: nn.GRUCell(3, 4), lambda: nn.LSTMCell(3, 4, bias=False)])
@pytest.mark.parametrize("output", ["trace", "full"])
def test_recurrent_cell_rules_match_the_reference(cell, output):
    torch.manual_seed(3)
    model = _Unrolled(cell()).double()
    x1, x2 = torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    assert _rules(model, x1) == [type(model.cell).__name__ + "Rule", "LinearRule"]
    want = reference_ntk(model, x1, x2, output=output)
    for method in ("structured", "auto"):
        _assert_exact(lazykernel.ntk(model, x1, x2, output=output, method=method), want)


class _Projected(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 5, proj_size=2, batch_first=True)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _OneByOne(nn.Module):
    """Runs its GRU on each example alone, ``[T, I]`` unbatched."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.stack([self.rnn(row)[0][-1] for row in x]))


@pytest.mark.parametrize("build", [_Projected, _OneByOne])
def test_recurrent_layers_the_rules_do_not_describe_go_to_the_generic_rule(build):
    torch.manual_seed(4)
    model = build().double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    rules = _rules(model, x)
    assert "PerExampleJacobian" in rules and not any(r.endswith(("LSTMRule", "GRURule")) for r in rules)
    _assert_exact(lazykernel.ntk(model, x, output="full"), reference_ntk(model, x, output="full"))


def test_recurrent_forward_computes_the_module_function():
    # the explicit forward the rules capture with, against PyTorch's own, outputs and final states
    from lazykernel._recurrent import cell_forward, recurrent_forward

    def keep(layer, direction, x, gi, previous, resets):
        return gi

    torch.manual_seed(5)
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    for module in (nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True),
                   nn.GRU(4, 5, num_layers=3, batch_first=True, bias=False),
                   nn.RNN(4, 5, nonlinearity="relu", bidirectional=True)):
        module = module.double()
        given = x if module.batch_first else x.transpose(0, 1)
        want_y, want_state = module(given)
        got_y, got_state = recurrent_forward(module, keep, given)
        torch.testing.assert_close(got_y, want_y)
        for got, want in zip(got_state if isinstance(got_state, tuple) else (got_state,),
                             want_state if isinstance(want_state, tuple) else (want_state,)):
            torch.testing.assert_close(got, want)
    cell = nn.LSTMCell(4, 5).double()
    state = (torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64))
    for got, want in zip(cell_forward(cell, keep, x[:, 0], state), cell(x[:, 0], state)):
        torch.testing.assert_close(got, want)


def test_recurrent_captures_take_one_backward_per_output():
    # PyTorch's backward batched over outputs runs the steps' many small ops far slower
    torch.manual_seed(6)
    model = _Sequence("gru").double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    assert lazykernel.plan(model, x).capture == "one backward per output"
    _assert_exact(lazykernel.ntk(model, x, output="full"), reference_ntk(model, x, output="full"))
