"""The benchmarks' plain-PyTorch structured baseline computes the same kernel."""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_ntk import plain_structured_bytes, plain_structured_ntk  # noqa: E402
from workloads import make_mlp  # noqa: E402

from conftest import reference_ntk  # noqa: E402


@pytest.mark.parametrize("output", ["trace", "full"])
@pytest.mark.parametrize("outputs", [1, 3])
def test_plain_structured_baseline_matches_the_reference(output, outputs):
    torch.manual_seed(0)
    model = make_mlp(16, outputs, depth=2, d_in=5).double().eval()
    x = torch.randn(7, 5, dtype=torch.float64)
    got = plain_structured_ntk(model, x, output)
    expected = reference_ntk(model, x, output=output)
    if outputs == 1 and output == "full":
        got = got[..., 0, 0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_plain_structured_bytes_counts_its_temporaries():
    assert plain_structured_bytes(10, 3, "trace") == 4.0 * (3 * 100 + 2 * 100)
    assert plain_structured_bytes(10, 3, "full") == 4.0 * (30 ** 2 + 100 * 9)
