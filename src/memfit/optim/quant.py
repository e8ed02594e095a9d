"""Block-wise dynamic 8-bit quantisation of optimizer states (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", ICLR 2022), written from the paper's description.

A state tensor is cut into blocks of 256 values; each block stores its absolute maximum in fp32 and every
value as the index (uint8) of the nearest entry of a 256-entry "dynamic" map of [-1, 1] (signed, for the first
moment m) or [0, 1] (unsigned, for the second moment v). The map spends its codes like a float: seven decades
10^-7..10^0, each holding twice as many evenly spaced values as the decade below, so small and large
magnitudes both keep a few significant digits.

Quantisation is exact nearest-value rounding without a search (Cannizzo's direct search): the top 16 bits of
an fp32 value (sign, exponent, 7 mantissa bits) pick one bin of fp32 values; a table gives, per bin, the number
j of midpoints below the bin and, if one midpoint lies inside it (never more: the map's spacing is wider than a
bf16 ulp everywhere), that midpoint's low 16 bits. The code is j plus one comparison of the value's low 16
bits with them (for a negative bin the order of the low bits is reversed, so both sides are flipped). Values
are normalised into [-1, 1], so only 26 exponents matter (below 2^-24 no midpoint lies; larger exponents are
clamped to the top one): the table has 2 x 26 x 128 int32 entries (26 KB, cache-resident), an index computed
from the value's bits with integer operations, and one gather per value, so the CPU kernel vectorises
(`tests/test_optim_quant.py` checks the result against `torch.bucketize` on a dense sweep of fp32 values).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from memfit.quant.codebooks import DECADES, dynamic_map

BLOCK = 256


E_LO = 102  # the lowest exponent with its own table rows: |x| < 2^(E_LO - 126) = 2^-24 lies below every midpoint
EXPONENTS = 26  # exponents E_LO .. 127 (values up to [1, 2)); smaller ones share row 0, larger ones the top row


def direct_index(bits: torch.Tensor) -> torch.Tensor:
    """Row of the direct table for int32 fp32 bit patterns: sign, clamped exponent, top 7 mantissa bits."""
    sign = (bits >> 31) & 1
    exponent = (((bits >> 23) & 0xFF) - E_LO).clamp(0, EXPONENTS - 1)
    return ((sign * EXPONENTS + exponent) << 7) | ((bits >> 16) & 0x7F)


# The arithmetic encoder (`encoder_table`): binades from 2^(ENC_E_MIN - 127) up get their own decade lookup.
ENC_E_MIN = 103  # the binade of 1e-7, the lowest decade's edge: every smaller value lies in decade 0 too
ENC_DELTA = 1 / 64  # u is lowered by this (> its rounding error, < the gap between two thresholds): c0 <= code
ENC_INTS = 128  # int32 words before the byte planes; offsets of each field within them below
ENC_D, ENC_L, ENC_O, ENC_S, ENC_B, ENC_TOP, ENC_E, ENC_NEG = 0, 32, 64, 80, 96, 112, 113, 114
ENC_LAYOUT = dict(ENC_E_MIN=ENC_E_MIN, ENC_INTS=ENC_INTS, ENC_D=ENC_D, ENC_L=ENC_L, ENC_O=ENC_O, ENC_S=ENC_S,
                  ENC_B=ENC_B, ENC_TOP=ENC_TOP, ENC_E=ENC_E, ENC_NEG=ENC_NEG)  # the C kernel's -D flags


def mids_of(qmap: torch.Tensor) -> torch.Tensor:
    """The 255 midpoints between neighbouring map entries, computed in double and rounded to fp32 once."""
    return ((qmap[:-1].double() + qmap[1:].double()) / 2).float()


def encoder_table(qmap: torch.Tensor, signed: bool) -> torch.Tensor:
    """The tables of the vector kernel's search-free encoder, as one uint8 buffer.

    The map is sign, decade and linear fraction, so the number of midpoints below a magnitude a in decade t
    (edges lo_t = 10^(t-7) .. 10^(t-6), n_t cells of width w_t) is C_t + min(floor(u), n_t - 1) + [u > B_t] +
    [u > E] with u = (a - lo_t) / w_t: C_t midpoints lie below the decade, its own grid puts one at each whole u,
    B_t is the midpoint to the decade below and E the one to the map's 1.0 (top decade only). The kernel computes
    U = a / w_t + (C_t - lo_t / w_t - ENC_DELTA) with one fused multiply-add (tables S and O), so C_t needs no
    addition and, since C_t grows with t, the clamp and E become constants of U (TOP, E). The decade comes from
    the binade (a per-binade start decade D and the next decade's edge L, one comparison). Lowering U by
    ENC_DELTA means rounding can only undercount, by at most one: the code is c0 + [mids[c0] < x], one exact
    comparison with a midpoint read from byte planes (four 256-byte tables, one per byte of the fp32 value,
    looked up 64 codes at a time). A negative x takes NEG - c0(|x|) with the signed map (it is mirrored), clamped
    at 0, and 0 with the unsigned one; NaN counts every midpoint, like the direct search. Layout: ENC_INTS int32
    words (fields at ENC_*), then the byte planes of the map (decoding) and of the midpoints with +inf appended
    (encoding), [4, 256] each.
    """
    mids = mids_of(qmap)
    mids64 = mids.double()
    words = torch.zeros(ENC_INTS, dtype=torch.int32)
    floats = words.view(torch.float32)
    lo = [10.0 ** (t - DECADES) for t in range(DECADES + 1)]  # lo[t + 1] is decade t's upper edge
    for t in range(16):  # decades 0..6; 7..15 repeat the top one (the kernel's permutes read 16 entries)
        d = min(t, DECADES - 1)
        n = 2**d if signed else 2 ** (d + 1)
        width = (lo[d + 1] - lo[d]) / n
        inside = mids64[(mids64 >= lo[d]) & (mids64 < lo[d + 1])]
        below = int((mids64 < lo[d]).sum())
        u = (inside - lo[d]) / width
        assert torch.allclose(u[1:n], torch.arange(1, n, dtype=torch.float64), atol=1e-4) and 0 < u[0] < 1, \
            "the map is not sign, decade and linear fraction"
        assert u.numel() == n + (d == DECADES - 1), "only the top decade holds the midpoint to 1.0"
        floats[ENC_S + t] = 1 / width
        floats[ENC_O + t] = below - lo[d] / width - ENC_DELTA
        floats[ENC_B + t] = below + u[0]
        if d == DECADES - 1:
            floats[ENC_TOP] = below + n - 1
            floats[ENC_E] = below + u[n]
    for e in range(32):
        start, end = 2.0 ** (ENC_E_MIN + e - 127), 2.0 ** (ENC_E_MIN + e - 126)
        d = max(0, min(DECADES - 1, sum(start >= lo[k] for k in range(1, DECADES))))
        words[ENC_D + e] = d
        floats[ENC_L + e] = lo[d + 1] if d + 1 < DECADES and lo[d + 1] < end else float("inf")
    words[ENC_NEG] = 2 * int((qmap < 0).sum()) - 1 if signed else -1  # 253: code(-a) = 253 - c0(a) (+ the fix)
    planes = [t.contiguous().view(torch.uint8).view(256, 4).t().contiguous().view(-1)
              for t in (qmap, torch.cat([mids, torch.tensor([float("inf")])]))]
    return torch.cat([words.view(torch.uint8), *planes])


@dataclass(frozen=True)
class QuantTables:
    """A map with its rounding tables, on one device."""

    qmap: torch.Tensor  # [256] fp32 sorted values
    direct: torch.Tensor  # [2 * EXPONENTS * 128] int32: j | threshold << 8 (see the module docstring)
    encoder: torch.Tensor  # uint8, CPU: the vector kernel's search-free encoder (`encoder_table`)

    @staticmethod
    def build(signed: bool) -> QuantTables:
        qmap = dynamic_map(signed)
        mids = ((qmap[:-1].double() + qmap[1:].double()) / 2).float()
        assert mids.abs().min() >= 2.0 ** (E_LO - 126)  # row 0 holds no midpoint, whatever the exponent below
        row = torch.arange(2 * EXPONENTS * 128, dtype=torch.int32)
        sign, exponent, mantissa = row >> 7 >= EXPONENTS, (row >> 7) % EXPONENTS + E_LO, row & 0x7F
        top = (sign.int() << 15) | (exponent << 7) | mantissa  # the bin's top 16 bits
        # The bin's lowest value: low bits 0 for a positive bin, 0xFFFF (the most negative) for a negative one.
        lowest = torch.where(sign, (top << 16) | 0xFFFF, top << 16).view(torch.float32)
        j = torch.bucketize(lowest, mids, right=False)  # midpoints strictly below the bin (a tie is not below)
        mid_bits = mids.view(torch.int32)[j.clamp(max=mids.numel() - 1)]
        inside = (j < mids.numel()) & (((mid_bits >> 16) & 0xFFFF) == top)
        flip = torch.where(sign, 0xFFFF, 0)
        threshold = torch.where(inside, (mid_bits & 0xFFFF) ^ flip, 0xFFFF)  # 0xFFFF: no midpoint, never above
        return QuantTables(qmap, (j.int() | (threshold << 8)).to(torch.int32), encoder_table(qmap, signed))

    def to(self, device: torch.device) -> QuantTables:
        return QuantTables(self.qmap.to(device), self.direct.to(device), self.encoder)


@cache
def tables(signed: bool, device: torch.device = torch.device("cpu")) -> QuantTables:
    base = QuantTables.build(signed)
    return base if device.type == "cpu" else base.to(device)


def quantize_normalized(x: torch.Tensor, t: QuantTables) -> torch.Tensor:
    """uint8 index of the nearest map entry for each value of x (already scaled into the map's range)."""
    bits = x.contiguous().view(torch.int32)
    entry = t.direct[direct_index(bits)]
    key = (bits & 0xFFFF) ^ torch.where(bits < 0, 0xFFFF, 0)
    return ((entry & 0xFF) + (key > (entry >> 8)).int()).to(torch.uint8)


def blocks_per_row(row: int) -> int:
    return -(-row // BLOCK)


def block_ids(start: int, stop: int, row: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Block index of every value in [start, stop) of a flat tensor whose blocks of BLOCK values run along rows
    of `row` values (a block never crosses a row; `row` = numel gives plain consecutive blocks)."""
    i = torch.arange(start, stop, device=device)
    return (i // row) * blocks_per_row(row) + (i % row) // BLOCK


def quantize(x: torch.Tensor, t: QuantTables, ids: torch.Tensor | None = None, nb: int | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 x -> (uint8 codes [n], fp32 absmax [nb]); `ids` from `block_ids` (default: consecutive blocks).
    Pass `nb` (the number of blocks) with `ids` to spare a device sync."""
    ids = block_ids(0, x.numel(), x.numel(), x.device) if ids is None else ids
    if nb is None:
        nb = int(ids[-1]) + 1 if ids.numel() else 0
    absmax = torch.zeros(nb, device=x.device).scatter_reduce_(0, ids, x.abs(), "amax")
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    return quantize_normalized(x * inv[ids], t), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, t: QuantTables, ids: torch.Tensor | None = None,
               ) -> torch.Tensor:
    """uint8 codes [n] and absmax [nb] -> fp32 values [n]."""
    ids = block_ids(0, codes.numel(), codes.numel(), codes.device) if ids is None else ids
    return t.qmap[codes.long()] * absmax[ids]
