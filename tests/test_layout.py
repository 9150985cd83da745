"""tuner/layout.py: the one owner of delta orientation, dense-or-factored form and exact addition."""

from __future__ import annotations

import pytest
import torch

from biasedit_peft.tuner.layout import (
    add_deltas,
    factored_is_smaller,
    factorise,
    in_smaller_form,
    native_factors,
    native_from_key_value,
    native_from_out_in_factors,
    out_in,
    out_in_factors,
)

D_IN, D_OUT, RANK = 6, 4, 2


@pytest.fixture
def key_value():
    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(D_IN, RANK, generator=generator), torch.randn(RANK, D_OUT, generator=generator)
    return left, right


@pytest.mark.parametrize("fan_in_fan_out, native_shape", [(True, (D_IN, D_OUT)), (False, (D_OUT, D_IN))])
def test_every_layout_describes_the_same_delta(key_value, fan_in_fan_out, native_shape):
    left, right = key_value
    dense = left @ right  # key -> value [d_in, d_out]
    native = native_from_key_value(dense, fan_in_fan_out)
    assert native.shape == native_shape
    a, b = native_factors(left, right, fan_in_fan_out)
    # the factors are the key / value factors themselves, transposed where the layout says: bitwise
    expected = (left, right) if fan_in_fan_out else (right.T, left.T)
    assert all(torch.equal(got, want) for got, want in zip((a, b), expected))
    torch.testing.assert_close(a @ b, native)  # a product in another order: equal up to rounding (FMA or not)
    assert torch.equal(out_in(native, fan_in_fan_out), dense.T)  # [out, in] whatever the layer
    lora_b, lora_a = out_in_factors(a, b, fan_in_fan_out)
    assert lora_b.shape == (D_OUT, RANK) and lora_a.shape == (RANK, D_IN)
    assert torch.equal(lora_b, right.T) and torch.equal(lora_a, left.T)
    torch.testing.assert_close(lora_b @ lora_a, dense.T)
    back = native_from_out_in_factors(lora_b, lora_a, fan_in_fan_out)
    assert all(torch.equal(got, want) for got, want in zip(back, (a, b)))


def test_the_smaller_form_and_exact_addition(key_value):
    # rank 2 of 4 x 6: 2 * 10 = 20 < 24 numbers, so factored; rank 3: 30 > 24, so dense
    assert factored_is_smaller(2, (4, 6)) and not factored_is_smaller(3, (4, 6))
    left, right = key_value
    a, b = native_factors(left, right, True)
    assert isinstance(in_smaller_form((a, b), (D_IN, D_OUT)), tuple)
    one = add_deltas(None, (a[:, :1], b[:1]), (D_IN, D_OUT))
    assert isinstance(one, tuple) and one[0].shape[1] == 1
    both = add_deltas(one, (a[:, 1:], b[1:]), (D_IN, D_OUT))  # factors concatenated: rank 2, exact
    assert isinstance(both, tuple) and torch.equal(both[0] @ both[1], a @ b)
    dense = add_deltas(both, (a, b), (D_IN, D_OUT))  # rank 4 is larger than dense: the product
    assert not isinstance(dense, tuple)
    torch.testing.assert_close(dense, 2 * (a @ b))
    torch.testing.assert_close(add_deltas(dense, (a, b), (D_IN, D_OUT)), 3 * (a @ b))


def test_factorise_is_exact_and_rank_revealing(key_value):
    left, right = key_value
    first, second = factorise(left @ right)
    assert first.shape == (D_IN, RANK) and second.shape == (RANK, D_OUT)
    torch.testing.assert_close(first @ second, left @ right, atol=1e-6, rtol=1e-5)
