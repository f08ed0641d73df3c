"""How the structured method takes its cotangents and patches: every path gives the same values.

A capture batched over outputs and one backward per output (with some targets
stored examples-first) must agree; the convolution's patch gather must equal
``F.unfold``; large working buffers must behave like ``torch.empty``.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lazykernel
from lazykernel import _chain, _memory, _structured, rules
from lazykernel._model import make_adapter
from lazykernel._structured import StructuredPlan, _batched_backward_falls_back, _output_cotangents

from conftest import OUTPUTS, assert_close_to_reference, reference_ntk

_HAS_FALLBACK_WARNINGS = hasattr(torch._C, "_debug_only_display_vmap_fallback_warnings")


def _mlp_graph():
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(4, 5).double(), nn.Linear(5, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    h = lin1(x)
    y = lin2(torch.tanh(h))
    return y, [h, y]


def test_per_output_cotangents_equal_the_batched_ones_in_either_layout():
    f, targets = _mlp_graph()
    batched = _output_cotangents(f, targets)
    looped = _output_cotangents(f, targets, per_output=True, examples_first=[True, False])
    for b, l, t in zip(batched, looped, targets):
        assert l.shape == b.shape == (3,) + tuple(t.shape)
        torch.testing.assert_close(l, b, rtol=0, atol=1e-14)
    # the first is stored [n, O, ...] and seen through a transpose; the second is [O, n, ...]
    n_first = looped[0]
    assert n_first.stride(0) == 5 and n_first.stride(1) == 3 * 5
    assert looped[1].is_contiguous()
    # ∂f_o/∂y is the one-hot cotangent itself
    torch.testing.assert_close(looped[1], torch.eye(3, dtype=torch.float64).unsqueeze(1).expand(3, 6, 3))


def test_per_output_cotangents_of_an_unused_target_are_zeros():
    torch.manual_seed(0)
    x = torch.randn(4, 3, requires_grad=True)
    for first in (True, False):
        unused = torch.randn(4, 2, requires_grad=True) * 2
        f = torch.stack([x.sum(1), (x ** 2).sum(1)], 1)
        got = _output_cotangents(f, [x, unused], per_output=True, examples_first=[first, first])
        assert torch.equal(got[1], torch.zeros(2, 4, 2))
        torch.testing.assert_close(got[0][1], 2 * x.detach())


def _cnn_and_mlp():
    """A CNN whose backward batched over outputs falls back (the second convolution's
    backward has no batching rule) and an MLP whose backward batches (linear maps, ReLU)."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.Flatten(), nn.Linear(12, 4))
    mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    return (cnn, torch.randn(3, 2, 4, 4)), (mlp, torch.randn(3, 4))


def _after_first_layer(model, x):
    """(the model's outputs, its first layer's outputs): a probe's f and target."""
    h = model[0](x)
    return model[1:](h), h


@pytest.mark.skipif(not _HAS_FALLBACK_WARNINGS, reason="this PyTorch has no vmap-fallback warnings to read")
def test_the_fallback_probe_tells_convolutions_from_plain_layers():
    cnn, mlp = _cnn_and_mlp()
    # the backward from the output to the first convolution's output runs the second one's
    y, h = _after_first_layer(*cnn)
    assert _batched_backward_falls_back(y, [h])
    # linear maps and ReLU have batching rules
    f, h1 = _after_first_layer(*mlp)
    assert not _batched_backward_falls_back(f, [h1, f])
    # one output has nothing to batch
    assert not _batched_backward_falls_back(y[:, :1], [h])
    # the probe leaves PyTorch's warning switch as it found it
    assert not torch._C._debug_only_are_vmap_fallback_warnings_enabled()


@pytest.mark.skipif(not _HAS_FALLBACK_WARNINGS, reason="this PyTorch has no vmap-fallback warnings to read")
def test_probes_in_several_threads_each_find_their_own_answer():
    import threading

    models = dict(zip((True, False), _cnn_and_mlp()))
    answers, errors = {True: [], False: []}, []

    def probe(expected):
        try:
            for _ in range(20):
                f, h = _after_first_layer(*models[expected])
                answers[expected].append(_batched_backward_falls_back(f, [h]))
        except Exception as error:  # reported below: a thread's exception would be lost
            errors.append(error)

    threads = [threading.Thread(target=probe, args=(expected,)) for expected in (True, False, True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert answers[True] == [True] * 40 and answers[False] == [False] * 40
    assert not torch._C._debug_only_are_vmap_fallback_warnings_enabled()


@pytest.mark.skipif(not _HAS_FALLBACK_WARNINGS, reason="this PyTorch has no vmap-fallback warnings to read")
def test_verification_chooses_one_backward_per_output_for_convolutions_only(monkeypatch):
    _without_chain(monkeypatch)
    cnn, mlp = _cnn_and_mlp()
    for (model, x), expected in ((cnn, True), (mlp, False)):
        plan = StructuredPlan.build(make_adapter(model, None))
        plan.verify(x, rows=1 << 20)
        assert plan.falls_back is expected
        assert plan.per_output_backward(1 << 20) is expected
        # batches too small to pay for a pass per output keep the batched backward
        assert plan.per_output_backward(8) is False
        plan.verify(x, rows=8)
        assert plan.falls_back is False


def test_a_layer_chain_spares_the_checks_of_the_batched_backward_unless_it_is_refused(monkeypatch):
    """With a verified chain autograd's batched backward is never taken, so how it
    fares is found only where the chain's own check refuses it."""
    (cnn, x), _ = _cnn_and_mlp()
    probes = []
    falls_back = _structured._batched_backward_falls_back

    def counting(*args):
        probes.append(1)
        return falls_back(*args)

    monkeypatch.setattr(_structured, "_batched_backward_falls_back", counting)
    plan = StructuredPlan.build(make_adapter(cnn, None))
    plan.verify(x, rows=1 << 20)
    assert plan.chain is not None and probes == [] and plan.falls_back is False
    monkeypatch.setattr(_structured, "_chain_agrees", lambda *args: False)
    plan = StructuredPlan.build(make_adapter(cnn, None))
    plan.verify(x, rows=1 << 20)
    assert plan.chain is None and probes == [1]
    if _HAS_FALLBACK_WARNINGS:
        assert plan.falls_back is True and plan.per_output_backward(1 << 20) is True


class TwiceConv(nn.Module):
    """One convolution applied twice, so its per-example gradient sums two calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 25, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.head(torch.tanh(self.conv(h)).flatten(1))


def _without_chain(monkeypatch):
    """Keep autograd's captures even for plain nn.Sequential models (`lazykernel._chain`)."""
    monkeypatch.setattr(_structured.LayerChain, "of", staticmethod(lambda module: None))


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("capture", ["batched", "per_output", "chain"])
@pytest.mark.parametrize("model_name", ["sequential", "twice", "grouped"])
@pytest.mark.parametrize("patch_chunk", [None, 2])
def test_convolution_gradient_form_is_exact_with_every_capture(output, capture, model_name, patch_chunk,
                                                               monkeypatch):
    if capture == "chain" and model_name == "twice":
        pytest.skip("a module with its own forward is not a layer chain")
    if patch_chunk:
        # patches gathered two examples at a time, the last chunk ragged (5 examples);
        # the chain's backward in chunks of three, so the gradients are built 2+1, 2
        monkeypatch.setattr(rules, "_patch_chunk", lambda nbytes, device, n: min(n, patch_chunk))
        monkeypatch.setattr(_chain, "_chunk_examples", lambda nbytes, device, n, at_least=0: min(n, 3))
    per_output = capture == "per_output"
    if capture != "chain":
        _without_chain(monkeypatch)
    torch.manual_seed(3)
    if model_name == "twice":
        model = TwiceConv().double()
    elif model_name == "grouped":
        model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.ReLU(),
                              nn.Conv2d(6, 2, 2, stride=2, dilation=2), nn.Flatten(), nn.Linear(8, 3)).double()
    else:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                              nn.Flatten(), nn.Linear(100, 3)).double()
    channels = 4 if model_name == "grouped" else 3
    x = torch.randn(5, channels, 5, 5, dtype=torch.float64)
    monkeypatch.setattr(_structured, "_batched_backward_falls_back", lambda f, targets: per_output)
    monkeypatch.setattr(_structured, "_PER_OUTPUT_PASS_BYTES", 0)
    plan = StructuredPlan.build(make_adapter(model, None))
    plan.verify(x[:3])
    assert plan.per_output_backward(x.shape[0]) is per_output
    assert (plan.chain is not None) is (capture == "chain")
    conv_rules = [i for i, rule in enumerate(plan.rules) if type(rule).__name__ == "Conv2dRule"]
    assert conv_rules
    for i, rule in enumerate(plan.rules):
        plan.forms[i] = ["gradient" if i in conv_rules else "pairwise"] * len(rule.shapes)
    if capture == "chain":
        # the convolutions' gradients are built from the chain's chunks, no cotangents kept
        chunks = []
        monkeypatch.setattr(rules._ConvRule, "add_chunk",
                            lambda self, g, rows, call=0, add=rules._ConvRule.add_chunk:
                            chunks.append((rows.start, rows.stop)) or add(self, g, rows, call))
    a, g, tokens, deferred = plan.operands(x)
    if capture == "chain":
        sizes = [(0, 3), (3, 5)] if patch_chunk else [(0, 5)]
        assert chunks == [size for size in sizes for _ in conv_rules]
    assert not tokens and not deferred
    out = torch.zeros(reference_ntk(model, x, output=output).shape, dtype=torch.float64)
    lazykernel.gram_hadamard_accumulate(out, a, a, g, g, output)
    assert_close_to_reference(out, reference_ntk(model, x, output=output), torch.float64)


@pytest.mark.parametrize("case", [
    dict(conv=nn.Conv2d(3, 4, 3, padding=1), shape=(2, 3, 6, 5)),
    dict(conv=nn.Conv2d(3, 4, (2, 3), stride=(2, 1), dilation=(1, 2), padding=(1, 2)), shape=(2, 3, 7, 8)),
    dict(conv=nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), shape=(3, 2, 5, 5)),
    dict(conv=nn.Conv2d(2, 4, 3, padding=2, padding_mode="circular"), shape=(1, 2, 4, 6)),
    dict(conv=nn.Conv2d(4, 4, 1, groups=2), shape=(2, 4, 3, 3)),
    dict(conv=nn.Conv1d(3, 2, 4, stride=3, dilation=2, padding=3), shape=(2, 3, 11)),
])
def test_patches_equal_unfold(case):
    from lazykernel.rules import rule_for

    torch.manual_seed(0)
    conv = case["conv"]
    rule = rule_for(conv)(conv, {"weight": "weight"})
    x = torch.randn(*case["shape"])
    # a non-contiguous, offset view of the same values must give the same patches
    wide = torch.randn(case["shape"][0], case["shape"][1] + 1, *case["shape"][2:]).transpose(0, 1)
    wide = wide.contiguous().transpose(0, 1)
    wide[:, 1:] = x
    for given in (x, wide[:, 1:]):
        patches = rule._unfold(given)
        padded = F.pad(x, conv._reversed_padding_repeated_twice,
                       mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        if isinstance(conv, nn.Conv1d):
            want = F.unfold(padded.unsqueeze(2), (1, conv.kernel_size[0]), dilation=(1, conv.dilation[0]),
                            stride=(1, conv.stride[0]))
        else:
            want = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        assert patches.shape == want.shape
        assert torch.equal(patches, want)
        # the patches multiply with the layer's weight to give the layer's output
        w = conv.weight.detach().reshape(conv.groups, conv.out_channels // conv.groups, -1)
        per_group = patches.reshape(patches.shape[0], conv.groups, -1, patches.shape[2])
        y = torch.einsum("gdk,ngkt->ngdt", w, per_group).reshape(patches.shape[0], conv.out_channels, -1)
        y = y + conv.bias.detach()[:, None]
        torch.testing.assert_close(y, conv(given).detach().flatten(2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("madvise", [True, False])
@pytest.mark.parametrize("shape, dtype", [((3, 4), torch.float32), ((5, 1 << 20), torch.float64),
                                          ((0, 7), torch.float32)])
def test_working_buffers_are_plain_tensors(shape, dtype, madvise, monkeypatch):
    # (5, 2**20) float64 is 40 MiB: over the size that asks for huge pages
    monkeypatch.setattr(_memory, "_madvise_works", madvise)
    buf = _memory.empty_buffer(shape, dtype, torch.device("cpu"))
    assert buf.shape == shape and buf.dtype == dtype and buf.is_contiguous()
    buf.fill_(1.5)
    assert buf.sum().item() == 1.5 * buf.numel()


@pytest.mark.parametrize("output", OUTPUTS)
def test_ntk_with_one_backward_per_output_matches_the_reference(output, monkeypatch):
    # every capture of these small models takes the per-output path
    monkeypatch.setattr(_structured, "_PER_OUTPUT_PASS_BYTES", 0)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                          nn.Tanh(), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 3))
    x1, x2 = torch.randn(5, 2, 4, 4), torch.randn(3, 2, 4, 4)
    modes = []

    def spy(f, targets, per_output=False, examples_first=None, **options):
        modes.append(per_output)
        return _output_cotangents(f, targets, per_output, examples_first, **options)

    monkeypatch.setattr(_structured, "_output_cotangents", spy)
    got = lazykernel.ntk(model, x1, x2, output=output, method="structured")
    if _HAS_FALLBACK_WARNINGS:
        assert True in modes
    assert_close_to_reference(got, reference_ntk(model, x1, x2, output=output), torch.float32)


@pytest.mark.skipif(not _HAS_FALLBACK_WARNINGS, reason="this PyTorch has no vmap-fallback warnings to read")
def test_the_plan_says_how_cotangents_are_taken(monkeypatch):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.Flatten(), nn.Linear(12, 4))
    x = torch.randn(6, 2, 4, 4)
    assert lazykernel.plan(cnn, x).capture == "one backward of the layer chain, batched over outputs"
    _without_chain(monkeypatch)
    assert lazykernel.plan(cnn, x).capture == "one backward batched over outputs"      # too small to pay
    monkeypatch.setattr(_structured, "_PER_OUTPUT_PASS_BYTES", 0)
    report = lazykernel.plan(cnn, x)
    assert report.capture == "one backward per output"
    assert "cotangents: one backward per output" in str(report)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    assert lazykernel.plan(mlp, torch.randn(6, 4)).capture == "one backward batched over outputs"
    # one output has a single backward, nothing to say
    assert lazykernel.plan(nn.Linear(4, 1), torch.randn(6, 4)).capture == ""
