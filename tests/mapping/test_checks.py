"""``is_finite``: a NaN or Inf anywhere is found, and finite values whose sum overflows are not mistaken for one."""

from __future__ import annotations

import pytest
import torch

from megatron_patch.mapping.checks import is_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_values_whose_sum_overflows_are_finite(dtype):
    big = torch.full((1000,), torch.finfo(dtype).max / 2, dtype=dtype)
    assert not torch.isfinite(big.sum())  # the precondition: the cheap sum does overflow
    assert is_finite(big)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_single_non_finite_value_is_found(dtype, bad):
    tensor = torch.randn(64, 33).to(dtype)
    tensor[17, 5] = bad
    assert not is_finite(tensor)
    assert is_finite(torch.randn(64, 33).to(dtype))
