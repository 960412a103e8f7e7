"""Host-to-device transfers of per-step sampling metadata (`layers.sampling.batch.to_device`):
the same values as `torch.tensor(..., device=...)`, through pinned memory on CUDA."""

from __future__ import annotations

import pytest
import torch

from paphos.layers.sampling.batch import to_device

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_gives_the_values_and_dtypes_of_a_plain_copy():
    cuda = torch.device("cuda")
    cases = [
        ([[1.5, 2.0], [3.0, -4.25]], torch.float32),
        ([True, False, True], torch.bool),
        ((3, 4, 5), torch.long),
    ]
    for data, dtype in cases:
        out = to_device(data, cuda, dtype)
        assert out.device.type == "cuda" and out.dtype == dtype
        assert torch.equal(out.cpu(), torch.tensor(data, dtype=dtype))
    host = torch.arange(12).view(3, 4)  # [3, 4]
    assert torch.equal(to_device(host, cuda).cpu(), host)


def test_to_device_on_the_cpu_is_a_plain_tensor():
    out = to_device([1, 2, 3], torch.device("cpu"), torch.long)
    assert out.dtype == torch.long and out.tolist() == [1, 2, 3]
