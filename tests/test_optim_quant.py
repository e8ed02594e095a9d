"""The dynamic maps and the table-driven rounding: exact nearest-value quantisation, against torch.bucketize."""

from __future__ import annotations

import pytest
import torch

from memfit.optim.quant import dequantize, dynamic_map, quantize, quantize_normalized, tables


@pytest.mark.parametrize("signed", [True, False])
def test_map_shape(signed):
    qmap = dynamic_map(signed)
    assert qmap.numel() == 256 and torch.all(qmap[1:] > qmap[:-1])
    assert qmap[-1] == 1.0 and (qmap == 0).sum() == 1
    assert (qmap[0] < -0.99) if signed else (qmap[0] == 0.0)
    assert qmap[qmap > 0].min() < 1e-6  # seven decades of range


@pytest.mark.parametrize("signed", [True, False])
def test_table_rounding_equals_bucketize(signed):
    t = tables(signed)
    # Every 331st fp32 bit pattern in [-1, 1], plus each midpoint and its neighbours (the ties and near-ties).
    sweep = torch.arange(-(2**31), 2**31 - 1, 331, dtype=torch.int64).to(torch.int32).view(torch.float32)
    mids = ((t.qmap[:-1].double() + t.qmap[1:].double()) / 2).float()
    x = torch.cat([sweep, mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    x = x[x.abs() <= 1] if signed else x[(x >= 0) & (x <= 1)]
    assert x.numel() > 1_000_000
    expected = torch.bucketize(x, mids)  # nearest map entry; a tie goes to the lower one
    assert torch.equal(quantize_normalized(x, t).long(), expected)


def test_quantize_round_trip_error_is_small_relative_to_block_max():
    x = torch.randn(10_000) * torch.logspace(-4, 0, 10_000)
    codes, absmax = quantize(x, tables(True))
    back = dequantize(codes, absmax, tables(True))
    assert codes.dtype == torch.uint8 and absmax.numel() == 40
    err = (back - x).abs() / absmax.repeat_interleave(256)[: x.numel()]
    assert err.max() < 0.0071  # half the widest gap of the map (0.9/64, top decade)
    v_codes, v_absmax = quantize(x.abs(), tables(False))
    v_back = dequantize(v_codes, v_absmax, tables(False))
    assert torch.equal(v_back[:9728].view(-1, 256).amax(1), v_absmax[:38])  # 1.0 is in the map: block max is exact


@pytest.mark.parametrize("signed", [True, False])
def test_map_values_written_independently(signed):
    """The dynamic map from its definition, computed here by hand: decade i (0..6) spans [0.1, 1]·10^(i-6) and
    holds the means of an even grid of 2^i (signed) or 2^(i+1) (unsigned) cells; plus 0 and 1."""
    qmap = dynamic_map(signed).double()
    positive = qmap[(qmap > 0) & (qmap < 1)]
    smallest, largest = (0.55e-6, 1 - 0.9 / 64 / 2) if signed else (0.325e-6, 1 - 0.9 / 128 / 2)
    assert positive.min().item() == pytest.approx(smallest, rel=1e-6)
    assert positive.max().item() == pytest.approx(largest, rel=1e-6)
    for i in range(7):
        lo, hi = 0.1 * 10.0 ** (i - 6), 10.0 ** (i - 6)
        assert int(((positive >= lo) & (positive < hi)).sum()) == (2**i if signed else 2 ** (i + 1)), i
    if signed:
        assert torch.equal(qmap[qmap < 0].flip(0), -qmap[(qmap > 0) & (qmap < 1)])  # mirrored, no -1 entry
    assert (qmap == 0).sum() == 1 and (qmap == 1).sum() == 1
    # Entries by hand: decade i's cells are 0.9 / n wide, so its values are (0.1 + (k + 1/2)·0.9/n)·10^(i-6).
    # Signed: 127 negatives, 0 at index 127, decade 0 from index 128; unsigned: 0 at index 0, decade 0 from 1.
    by_hand = {128: 0.55e-6, 129: 3.25e-6, 130: 7.75e-6, 131: 2.125e-5, 132: 4.375e-5, 133: 6.625e-5,
               134: 8.875e-5, 191: 0.10703125, 254: 0.99296875, 255: 1.0, 127: 0.0, 126: -0.55e-6, 0: -0.99296875,
               } if signed else {0: 0.0, 1: 3.25e-7, 2: 7.75e-7, 3: 2.125e-6, 4: 4.375e-6, 5: 6.625e-6, 6: 8.875e-6,
                                 127: 0.103515625, 128: 0.110546875, 254: 0.996484375, 255: 1.0}
    for j, value in by_hand.items():
        assert qmap[j].item() == pytest.approx(value, rel=1e-7, abs=0), j  # fp32 rounding: < 6e-8 relative


@pytest.mark.parametrize("signed", [True, False])
def test_map_equals_bitsandbytes_dynamic_map(signed):
    """A second independent reference: bitsandbytes' own map (its defaults, 7 exponent bits of 8, give the same
    256 values: no extra linear entries). It computes the grid in fp32, we in fp64 and round once, so entries
    may differ by an fp32 rounding (measured: at most 1.45e-7 relative); compared relatively, so a wrong tiny
    entry is not hidden by an absolute tolerance."""
    functional = pytest.importorskip("bitsandbytes.functional")
    theirs = functional.create_dynamic_map(signed=signed).float().sort().values
    torch.testing.assert_close(dynamic_map(signed), theirs, rtol=2.5e-7, atol=0)
