"""Block quantization of a weight tensor, in torch ops (any device): the reference the CPU kernel is held to.

A weight is flattened (row-major) and cut into blocks of `block_size` values (the last one may be shorter);
each block keeps its absolute maximum, and each value the index of the nearest codebook entry of value/absmax
(ties to the lower entry). NF4 packs two indices per byte, the first value in the high nibble; int8 stores one.
This is bitsandbytes' layout, so its CUDA kernels read memfit's tensors unchanged.

Double quantization (QLoRA): the fp32 absmax values, minus their mean, are quantized again with the signed
8-bit dynamic map in blocks of 256, which takes the scales from 32 to 8 bits per block (+ 32 bits per 256).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memfit.quant.codebooks import BITS, CODEBOOKS, dynamic_map

ABSMAX_BLOCK = 256
TINY = 1e-38  # an all-zero block divides by this, so its values stay 0 (index of the exact zero)


def blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def _absmax(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    n = flat.numel()
    full = n - n % block_size
    amax = flat[:full].view(-1, block_size).abs().amax(dim=1)
    if full < n:
        amax = torch.cat([amax, flat[full:].abs().amax().unsqueeze(0)])
    return amax


def _scaled(flat: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """flat / its block's absmax (as a multiply by the reciprocal), clamped into [-1, 1]."""
    n = flat.numel()
    inv = 1.0 / absmax.clamp(min=TINY)
    per_value = inv.repeat_interleave(block_size)[:n]
    return (flat * per_value).clamp(-1, 1)


def nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest entry of the sorted `codebook` for each value; a tie goes to the lower."""
    mids = (codebook[:-1] + codebook[1:]) / 2
    return torch.bucketize(x, mids, right=False)


def quantize_blocks(weight: torch.Tensor, kind: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, absmax fp32 [blocks]) of `weight`; codes hold ceil(n/2) bytes for NF4, n for int8."""
    flat = weight.detach().reshape(-1).float()
    absmax = _absmax(flat, block_size)
    scaled = _scaled(flat, absmax, block_size)
    if kind == "int8":
        return torch.round(scaled * 127).to(torch.int8).view(torch.uint8), absmax
    codebook = CODEBOOKS[kind]().to(flat.device)
    q = nearest(scaled, codebook).to(torch.uint8)
    if q.numel() % 2:  # an odd count pads one nibble with the index of 0
        q = torch.cat([q, nearest(flat.new_zeros(1), codebook).to(torch.uint8)])
    return (q[0::2] << 4) | q[1::2], absmax


def indices(codes: torch.Tensor, kind: str, n: int) -> torch.Tensor:
    """The codebook index (int64) of each of the n values."""
    if BITS[kind] == 8:
        return codes[:n].long()
    both = torch.stack([codes >> 4, codes & 0xF], dim=1).reshape(-1)
    return both[:n].long()


def dequantize_blocks(codes: torch.Tensor, absmax: torch.Tensor, kind: str, shape: torch.Size, block_size: int,
                      ) -> torch.Tensor:
    """The fp32 weight of `shape` back from its codes and (fp32) absmax."""
    n = shape.numel()
    values = CODEBOOKS[kind]().to(codes.device)[indices(codes, kind, n)]
    full = n - n % block_size
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    out[:full] = (values[:full].view(-1, block_size) * absmax[: full // block_size, None]).view(-1)
    if full < n:
        out[full:] = values[full:] * absmax[-1]
    return out.view(shape)


@dataclass
class PackedScales:
    """Double-quantized absmax: codes (uint8 [blocks]), scale (fp32 [blocks / 256]) and offset (fp32 scalar)."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor


def pack_scales(absmax: torch.Tensor) -> PackedScales:
    offset = absmax.mean()
    centred = absmax - offset
    scale = _absmax(centred, ABSMAX_BLOCK)
    codes = nearest(_scaled(centred, scale, ABSMAX_BLOCK), dynamic_map(signed=True).to(absmax.device))
    return PackedScales(codes.to(torch.uint8), scale, offset.reshape(()))


def unpack_scales(packed: PackedScales) -> torch.Tensor:
    """fp32 absmax back: map value x its block's scale, plus the offset (bitsandbytes' order of operations)."""
    values = dynamic_map(signed=True).to(packed.codes.device)[packed.codes.long()]
    n = values.numel()
    per_value = packed.scale.repeat_interleave(ABSMAX_BLOCK)[:n]
    return values * per_value + packed.offset
