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

from memfit.quant.codebooks import dynamic_map

BLOCK = 256


E_LO = 102  # the lowest exponent with its own table rows: |x| < 2^(E_LO - 126) = 2^-24 lies below every midpoint
EXPONENTS = 26  # exponents E_LO .. 127 (values up to [1, 2)); smaller ones share row 0, larger ones the top row


def direct_index(bits: torch.Tensor) -> torch.Tensor:
    """Row of the direct table for int32 fp32 bit patterns: sign, clamped exponent, top 7 mantissa bits."""
    sign = (bits >> 31) & 1
    exponent = (((bits >> 23) & 0xFF) - E_LO).clamp(0, EXPONENTS - 1)
    return ((sign * EXPONENTS + exponent) << 7) | ((bits >> 16) & 0x7F)


# The kernel's search-free encoder (`encoder_table`), in 16-bit lanes on a value's top 16 bits (its key).
ENC_K0 = 103 << 7  # keys below the binade of 2^-24 all become k' = 0: no midpoint lies below 2^-24
ENC_BINADES = 25  # binades 2^-24 .. [1, 2); 1.0 and up, inf and NaN are clamped into the top one
ENC_KMAX = ENC_BINADES * 128 - 1
ENC_INTS = 128  # int32 words before the byte planes; offsets of each field within them below
ENC_EDGE, ENC_A, ENC_B, ENC_NEG = 0, 16, 48, 80  # EDGE: 32 uint16, A and B: 64 uint16 each, NEG: one int32
ENC_MIDS = 4 * ENC_INTS + 2 * 1024  # byte offset of the fp32 midpoints, after the words and the two sets of planes
ENC_LAYOUT = dict(ENC_K0=ENC_K0, ENC_KMAX=ENC_KMAX, ENC_INTS=ENC_INTS, ENC_EDGE=ENC_EDGE, ENC_A=ENC_A,
                  ENC_B=ENC_B, ENC_NEG=ENC_NEG, ENC_MIDS=ENC_MIDS)  # the C kernel's -D flags


def mids_of(qmap: torch.Tensor) -> torch.Tensor:
    """The 255 midpoints between neighbouring map entries, computed in double and rounded to fp32 once."""
    return ((qmap[:-1].double() + qmap[1:].double()) / 2).float()


def encoder_bound(keys: torch.Tensor, edge: torch.Tensor, a: torch.Tensor, b: torch.Tensor, neg: int,
                  signed: bool) -> torch.Tensor:
    """The kernel's lower bound c0 of the code, for int64 keys (top 16 bits of fp32 values), in its integer steps:
    k' = min(sat(|k| - K0), KMAX); segment = k' >> 7, + 32 past the binade's EDGE; c0 = ((((k' << 9) mod 2^16)
    * A >> 16) + B) mod 2^16 >> 8; a negative key takes max(NEG - c0, 0) (signed map) or 0."""
    kp = ((keys & 0x7FFF) - ENC_K0).clamp(0, ENC_KMAX)
    binade = kp >> 7
    seg = binade + 32 * (kp >= edge[binade]).long()
    c = (((((kp << 9) & 0xFFFF) * a[seg]) >> 16) + b[seg]) % 65536 >> 8
    negative = keys >= 0x8000
    return torch.where(negative, (neg - c).clamp(min=0) if signed else torch.zeros_like(c), c)


def _line(lo: torch.Tensor, hi: torch.Tensor, m: torch.Tensor, widths: tuple[int, ...] = (64, 1024),
          ) -> tuple[int, int] | None:
    """A, B (uint16) with lo <= c0(m) <= hi for every mantissa key m of one segment, or None. A is searched
    around the chord's slope, within each of `widths` in turn."""
    mid = (lo + hi).double() / 2
    slope = float((mid[-1] - mid[0]) / max(int(m[-1] - m[0]), 1))
    centre = min(max(round(slope * 32768), 0), 65535)
    for width in widths:
        a = torch.arange(max(centre - width, 0), min(centre + width, 65535) + 1)
        x = (((m << 9) & 0xFFFF)[None, :] * a[:, None]) >> 16
        b_lo, b_hi = ((lo * 256)[None, :] - x).amax(1), ((hi * 256 + 255)[None, :] - x).amin(1)
        ok = torch.nonzero(b_lo <= b_hi).flatten()
        if ok.numel():
            i = int(ok[(b_hi - b_lo)[ok].argmax()])  # the widest margin
            return int(a[i]), int((b_lo[i] + b_hi[i]) // 2) % 65536
    return None


def encoder_table(qmap: torch.Tensor, signed: bool) -> torch.Tensor:
    """The tables of the vector kernel's search-free encoder, as one uint8 buffer.

    Codes are found 32 at a time in 16-bit lanes from a value's key (its top 16 bits: sign, exponent and 7
    mantissa bits, the direct search's bins; `encoder_bound` is the formula). Within one binade the map is
    linear in the key except where a decade begins, so a line per binade (two where a decade edge splits it,
    the second past EDGE) in 16-bit fixed point gives c0 with c0 <= code <= c0 + 1 for every value of the bin,
    and one exact comparison with the midpoint above c0, read from byte planes (four 256-byte tables, one per
    byte of the fp32 value, looked up 64 codes at a time), finishes it. A negative key takes NEG - c0 of its
    magnitude with the signed map (it is mirrored), clamped at 0, and 0 with the unsigned one; NaN and inf
    count like the direct search (their c0 is already the code: NaN fails the comparison). The lines are
    fitted here to the bins' code ranges, and every one of the 65,536 keys is checked before the table is used.
    Layout: ENC_INTS int32 words (fields at ENC_*), then the byte planes of the map (decoding) and of the
    midpoints with +inf appended (encoding), [4, 256] each, then those midpoints as fp32 (at ENC_MIDS: the
    kernel's gathers read them where they are faster than byte permutes)."""
    mids = mids_of(qmap)
    neg = 2 * int((qmap < 0).sum()) - 1 if signed else -1  # 253: code(-a) = 253 - c0(a) (+ the comparison)
    keys = torch.arange(65536, dtype=torch.int64)
    edges = [(keys << 16).to(torch.int32).view(torch.float32), ((keys << 16) | 0xFFFF).to(torch.int32).view(
        torch.float32)]  # each bin's first and last value
    nan = torch.isnan(edges[1])  # the NaN bins and inf's, whose values all count like +-inf (the direct search)
    first, last = (torch.bucketize(e, mids) for e in edges)  # the codes: midpoints strictly below
    low, high = torch.minimum(first, last), torch.maximum(first, last)
    plus = keys < 0x8000
    low = torch.where(nan, torch.where(plus, 255, 0), low)
    high = torch.where(nan, torch.where(plus, 256, 0), high)  # NaN fails the comparison: c0 must be its code
    # allowed c0 of each positive key: its own bin, and (signed) the mirrored bin through max(NEG - c0, 0)
    pos, negk = keys[:0x8000], keys[0x8000:]
    lo, hi = high[pos] - 1, low[pos].clone()
    if signed:
        lo = torch.maximum(lo, neg - low[negk])
        hi = torch.minimum(hi, torch.where(high[negk] <= 1, 255, neg - high[negk] + 1))
    lo, hi = lo.clamp(min=0), hi.clamp(max=255)
    kp = ((pos & 0x7FFF) - ENC_K0).clamp(0, ENC_KMAX)  # keys that share k' must share c0
    klo = torch.full((ENC_KMAX + 1,), -(2**30), dtype=torch.int64).scatter_reduce(0, kp, lo, "amax")
    khi = torch.full((ENC_KMAX + 1,), 2**30, dtype=torch.int64).scatter_reduce(0, kp, hi, "amin")
    edge, a, b = torch.full((32,), 0xFFFF), torch.zeros(64, dtype=torch.int64), torch.zeros(64, dtype=torch.int64)
    for binade in range(ENC_BINADES):
        m = torch.arange(128)
        at = binade * 128 + m
        line = _line(klo[at], khi[at], m, (64,))
        if line is not None:
            a[binade], b[binade] = line
            continue
        split, fails, first_line = 1, 128, None  # bisect the longest first line (a prefix of a line is one)
        while fails - split > 1:
            half = (split + fails) // 2
            line = _line(klo[at[:half]], khi[at[:half]], m[:half], (64,))
            split, fails, first_line = (half, fails, line) if line else (split, half, first_line)
        first_line = first_line or _line(klo[at[:1]], khi[at[:1]], m[:1])
        rest = _line(klo[at[split:]], khi[at[split:]], m[split:])
        assert first_line is not None and rest is not None, f"binade {binade}: the map is not two lines in the key"
        (a[binade], b[binade]), (a[binade + 32], b[binade + 32]) = first_line, rest
        edge[binade] = binade * 128 + split
    c0 = encoder_bound(keys, edge, a, b, neg, signed)
    ok = (c0 >= high - 1) & (c0 <= low)
    assert bool(ok.all()), f"the encoder misses {int((~ok).sum())} keys"
    words = torch.zeros(ENC_INTS, dtype=torch.int32)
    halves = words.view(torch.int16)
    for offset, values in ((ENC_EDGE, edge), (ENC_A, a), (ENC_B, b)):
        halves[2 * offset:2 * offset + values.numel()] = torch.where(values > 32767, values - 65536, values)
    words[ENC_NEG] = neg
    above = torch.cat([mids, torch.tensor([float("inf")])])
    planes = [t.contiguous().view(torch.uint8).view(256, 4).t().contiguous().view(-1) for t in (qmap, above)]
    return torch.cat([words.view(torch.uint8), *planes, above.view(torch.uint8)])


@dataclass(frozen=True)
class QuantTables:
    """A map with its rounding tables, on one device."""

    qmap: torch.Tensor  # [256] fp32 sorted values
    direct: torch.Tensor  # [2 * EXPONENTS * 128] int32: j | threshold << 8 (see the module docstring)
    encoder: torch.Tensor  # uint8, CPU: the vector kernel's search-free encoder (`encoder_table`)

    @staticmethod
    def build(signed: bool) -> QuantTables:
        qmap = dynamic_map(signed)
        mids = mids_of(qmap)
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
