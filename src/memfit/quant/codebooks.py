"""The value maps of block quantization, derived from their papers' rules (not copied tables).

NF4 (Dettmers et al., "QLoRA", 2023): 16 values, the quantiles of N(0, 1) normalised to [-1, 1], asymmetric so
that 0 is exact: 8 positive quantiles of the upper half and 7 negative ones of the lower half, at probabilities
spaced evenly from the offset 0.9677 (midway between 1 - 1/30 and 1 - 1/32, the two ends' half-bin points) to
0.5. int8: 255 evenly spaced values q/127, q = -127..127 (code 128, i.e. -128, decodes to -128/127 and is never
written). dynamic: the 8-bit dynamic map of 8-bit optimizers (sign, decade, linear fraction) used for the
double quantization of absmax values.
"""

from __future__ import annotations

from functools import cache

import torch

DECADES = 7
NF4_OFFSET = 0.9677083  # (1 - 1/30 + 1 - 1/32) / 2, to the 7 digits the paper's code uses


@cache
def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted fp32 values of the signed (m) or unsigned (v) dynamic map, including 0 and 1."""
    values = [torch.tensor([0.0, 1.0], dtype=torch.float64)]
    for i in range(DECADES):
        # Decade i spans [0.1, 1]·10^(i-6): 2^i midpoints of an even grid (signed), 2^(i+1) unsigned.
        n = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        means = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - DECADES + 1)
        values += [means, -means] if signed else [means]
    qmap = torch.cat(values).sort().values.float()
    assert qmap.numel() == 256
    return qmap


@cache
def nf4() -> torch.Tensor:
    """The 16 sorted NF4 values (fp32), index 7 the exact zero."""
    # probabilities in fp32, quantiles in fp64, normalised in fp32: the reference implementation's precisions
    p_pos = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double()
    p_neg = torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double()
    positive, negative = torch.special.ndtri(p_pos), -torch.special.ndtri(p_neg)
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    values = values.float()
    return values / values.abs().max()


@cache
def int8() -> torch.Tensor:
    """The 256 decoded values of an int8 code read as a uint8 index: int8(u) / 127."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).float() / 127


CODEBOOKS = {"nf4": nf4, "int8": int8}
BITS = {"nf4": 4, "int8": 8}
