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
    mids = t.mids[:-1]
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


@pytest.mark.parametrize("signed", [True, False])
def test_map_equals_bitsandbytes_dynamic_map(signed):
    """A second independent reference: bitsandbytes' own map (its defaults: 7 exponent bits, 8 bits in all)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    theirs = functional.create_dynamic_map(signed=signed).float().sort().values
    assert torch.allclose(dynamic_map(signed), theirs, rtol=0, atol=1e-7)
