"""``dtypes.all_finite`` (the one-reduction NaN/Inf check used on every tensor read and written) agrees with
``torch.isfinite(t).all()`` on every float dtype, including the largest finite values (no false alarm)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lata_peft.dtypes import all_finite

SPECIAL = [float("nan"), float("inf"), -float("inf")]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       size=st.integers(1, 300), seed=st.integers(0, 10_000),
       specials=st.lists(st.tuples(st.integers(0, 299), st.sampled_from(SPECIAL)), max_size=3),
       huge=st.booleans())
def test_all_finite_is_isfinite_all(dtype: torch.dtype, size: int, seed: int, specials: list, huge: bool) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(size, generator=generator).to(dtype)
    if huge:  # every entry the largest finite value of the dtype, both signs: the sum must not overflow
        tensor = torch.full((size,), torch.finfo(dtype).max, dtype=dtype) * torch.sign(tensor).to(dtype)
    for index, value in specials:
        tensor[index % size] = value
    assert all_finite(tensor) == bool(torch.isfinite(tensor).all())
