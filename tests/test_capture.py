"""Large working buffers behave like ``torch.empty``, with or without huge pages."""

import pytest
import torch

from lazykernel import _memory


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
