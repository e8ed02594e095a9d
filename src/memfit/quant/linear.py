"""The quantized Linear: a frozen block-quantized weight and a matmul that never holds its fp32 copy.

`QuantWeight` is the weight (an nn.Module of buffers, so `.to()`, state_dict and the meta device work), kept
under the Linear's `weight` name: `q_proj.weight.codes`, `q_proj.weight.absmax` (or `absmax_codes`,
`absmax_scale`, `absmax_offset` with double quantization). `QuantLinear` keeps nn.Linear's interface
(in_features, out_features, weight, bias), so adapters wrap it as they wrap any Linear; `linear()` is the one
call every layer's base forward goes through.

On the CPU the product runs tile by tile: a few rows of the weight (TILE values, cache-resident) are dequantized
into one fp32 buffer and multiplied; the backward does the same for the input gradient (the weight gets none).
Elsewhere (CUDA) the weight is dequantized whole, by bitsandbytes' kernel when it is installed, else by torch ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from memfit.errors import ConfigError
from memfit.quant import kernels
from memfit.quant.blockwise import PackedScales, blocks, dequantize_blocks, unpack_scales
from memfit.quant.codebooks import BITS, CODEBOOKS, dynamic_map
from memfit.tiers.vocab import consecutive_runs

_DYNAMIC = dynamic_map(signed=True)  # the double quantization's map, kept alive for the kernel's pointer
TILE = 1 << 18  # fp32 values per dequantized tile: 1 MB, this CPU's L2 per core (smaller tiles starve the GEMM)


class QuantWeight(nn.Module):
    """A frozen weight of `shape` stored as `kind` codes ('nf4', 'int8') in blocks of `block_size`."""

    memfit_streamable_buffers = True  # its buffers are weights: `memfit.tiers.stream` reads them per use

    def __init__(self, kind: str, shape: torch.Size | tuple[int, ...], block_size: int, codes: torch.Tensor,
                 absmax: torch.Tensor | PackedScales, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.kind, self.shape, self.block_size, self.dtype = kind, torch.Size(shape), block_size, dtype
        n, nb = self.shape.numel(), blocks(self.shape.numel(), block_size)
        expected = {"codes": (torch.uint8, (n * BITS[kind] + 7) // 8)}
        self.register_buffer("codes", codes)
        if isinstance(absmax, PackedScales):
            self.register_buffer("absmax_codes", absmax.codes)
            self.register_buffer("absmax_scale", absmax.scale)
            self.register_buffer("absmax_offset", absmax.offset)
            expected |= {"absmax_codes": (torch.uint8, nb), "absmax_scale": (torch.float32, blocks(nb, 256)),
                         "absmax_offset": (torch.float32, 1)}
        else:
            self.register_buffer("absmax", absmax)
            expected["absmax"] = (torch.float32, nb)
        for name, (want, size) in expected.items():
            t = getattr(self, name)
            if t.dtype != want or t.numel() != size:
                raise ConfigError(f"quantized weight: {name} must hold {size} {want} values for a {kind} weight of "
                                  f"shape {list(self.shape)} in blocks of {block_size}, got {t.numel()} {t.dtype}; "
                                  "the quantized checkpoint does not match its config (quantize the model again).")

    @property
    def double_quant(self) -> bool:
        return hasattr(self, "absmax_codes")

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def requires_grad(self) -> bool:
        return False

    def is_floating_point(self) -> bool:
        return False

    def numel(self) -> int:
        return self.shape.numel()

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def requires_grad_(self, requires_grad: bool = True) -> QuantWeight:
        if requires_grad:
            raise ConfigError(f"a {self.kind} quantized weight {list(self.shape)} is frozen and cannot be trained; "
                              "train an adapter on it (--method lora, ...), or load the model without --quantize "
                              "to train its weights.")
        return self

    def _apply(self, fn, recurse=True):  # .to(device) moves the codes and scales, but never recasts them
        dtypes = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        return self

    def part_names(self) -> tuple[str, ...]:
        """Names of its tensors, in `Parts` order."""
        return ("codes", "absmax_codes", "absmax_scale", "absmax_offset") if self.double_quant else ("codes", "absmax")

    def parts(self) -> Parts:
        """The tensors this weight holds now (a streamed weight swaps them per use), with its layout."""
        return Parts(self.kind, self.shape, self.block_size, self.dtype,
                     tuple(getattr(self, n) for n in self.part_names()))

    def absmax_values(self) -> torch.Tensor:
        return self.parts().absmax_values()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole weight in `dtype` (default: the dtype it was quantized from)."""
        return self.parts().dequantize(dtype)

    def tiles(self):
        return self.parts().tiles()

    def extra_repr(self) -> str:
        return (f"{self.kind}, shape={list(self.shape)}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}")


@dataclass(frozen=True)
class Parts:
    """A quantized weight's layout and tensors: (codes, absmax) or (codes, absmax codes, scale, offset)."""

    kind: str
    shape: torch.Size
    block_size: int
    dtype: torch.dtype
    tensors: tuple[torch.Tensor, ...]

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def absmax_values(self) -> torch.Tensor:
        if len(self.tensors) == 4:
            return unpack_scales(PackedScales(*self.tensors[1:]))
        return self.tensors[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if self.device.type == "cuda":
            try:
                return _bnb_dequantize(self).to(dtype)
            except ImportError:
                pass
        return dequantize_blocks(self.tensors[0], self.absmax_values(), self.kind, self.shape, self.block_size
                                 ).to(dtype)

    def tiles(self):
        """(first row, last row, fp32 rows [r, in]) over the weight, each tile dequantized into one reused buffer."""
        rows, cols = self.shape[0], self.shape.numel() // max(self.shape[0], 1)
        step = max(1, TILE // max(cols, 1))
        lib = _kernel(self)
        absmax = None if lib else self.absmax_values()
        args = self._kernel_args() if lib else ()
        buf = torch.empty(min(step, rows) * cols, dtype=torch.float32)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out = buf[: (r1 - r0) * cols]
            if lib is None:
                out.copy_(self._dequantize_rows(r0, r1, cols, absmax))
            else:
                lib.dequant_range(*args, r0 * cols, r1 * cols, out.data_ptr())
            yield r0, r1, out.view(r1 - r0, cols)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (sorted unique, 1-D) of the weight in fp32, [len(ids), cols]: a lookup dequantizes only its
        rows (one kernel call per run of consecutive ids)."""
        cols = self.shape.numel() // max(self.shape[0], 1)
        if self.device.type != "cpu":
            return self.dequantize(torch.float32).view(self.shape[0], cols).index_select(0, ids.to(self.device))
        host = ids.tolist()
        out = torch.empty(len(host), cols, dtype=torch.float32)
        lib = _kernel(self)
        args, absmax = (self._kernel_args(), None) if lib else ((), self.absmax_values())
        for a, r0, r1 in consecutive_runs(host):
            if lib is None:
                out[a:a + r1 - r0] = self._dequantize_rows(r0, r1, cols, absmax).view(r1 - r0, cols)
            else:
                lib.dequant_range(*args, r0 * cols, r1 * cols, out[a:a + r1 - r0].data_ptr())
        return out

    def _kernel_args(self) -> tuple:
        """The kernel's leading arguments (memfit.quant.kernels); the sizes were checked when the weight was built,
        and a streamed weight's tensors are checked here (its placeholders are empty)."""
        if self.device.type != "cpu":
            raise ConfigError(f"the CPU kernel got a quantized weight on {self.device}.")
        if self.tensors[0].numel() != (self.shape.numel() * BITS[self.kind] + 7) // 8:
            raise ConfigError(f"a quantized weight {list(self.shape)} is not loaded (its codes hold "
                              f"{self.tensors[0].numel()} bytes); a streamed layer ran outside its stream.")
        book = CODEBOOKS[self.kind]()
        if len(self.tensors) == 4:
            codes, scale, offset = self.tensors[1:]
            scales = (None, codes.data_ptr(), _DYNAMIC.data_ptr(), scale.data_ptr(), float(offset))
        else:
            scales = (self.tensors[1].data_ptr(), None, None, None, 0.0)
        return (self.tensors[0].data_ptr(), *scales, book.data_ptr(), BITS[self.kind], self.block_size)

    def _dequantize_rows(self, r0: int, r1: int, cols: int, absmax: torch.Tensor) -> torch.Tensor:
        """Torch-op fallback of one tile (no compiler): the whole weight's arithmetic, on its rows only."""
        lo, hi = r0 * cols, r1 * cols
        b0 = lo // self.block_size
        start = b0 * self.block_size  # decode from the tile's first block boundary (even: block sizes are even)
        codes = self.tensors[0][start * BITS[self.kind] // 8: (hi * BITS[self.kind] + 7) // 8]
        values = dequantize_blocks(codes, absmax[b0: b0 + blocks(hi - start, self.block_size)], self.kind,
                                   torch.Size([hi - start]), self.block_size)
        return values[lo - start:]


def _kernel(parts: Parts):
    """The compiled kernel (ctypes) for these tensors, or None: no compiler, or fake tensors (a `memfit plan`
    trace), which have no bytes to read and take the torch-op path of the same shapes."""
    return None if isinstance(parts.tensors[0], FakeTensor) else kernels.load()


def _bnb_dequantize(parts: Parts) -> torch.Tensor:
    """bitsandbytes' CUDA dequantization of memfit's tensors (the same layout: no copy, no conversion)."""
    import bitsandbytes.functional as bnbf

    codes, absmax, code = parts.tensors[0], parts.absmax_values(), CODEBOOKS[parts.kind]().to(parts.device)
    if parts.kind == "int8":
        state = bnbf.QuantState(absmax=absmax, code=code, blocksize=parts.block_size, dtype=torch.float32)
        return bnbf.dequantize_blockwise(codes, state)[: parts.shape.numel()].view(parts.shape)
    state = bnbf.QuantState(absmax=absmax, shape=parts.shape, code=code, blocksize=parts.block_size,
                            quant_type="nf4", dtype=torch.float32)
    return bnbf.dequantize_4bit(codes.view(-1, 1), state)


class _QuantMatmul(torch.autograd.Function):
    """y = x W^T for a quantized W; the backward gives x's gradient only (W is frozen) and dequantizes again, so
    no fp32 weight is kept between the passes. The codes are saved as autograd tensors: under activation
    checkpointing (weight streaming) they are dropped after the forward and re-read by the recompute.
    CPU fp32: tile by tile (`Parts.tiles`); elsewhere the weight is dequantized whole, used and freed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantWeight | Parts) -> torch.Tensor:
        parts = weight if isinstance(weight, Parts) else weight.parts()
        ctx.layout = (parts.kind, parts.shape, parts.block_size, parts.dtype)
        ctx.save_for_backward(*parts.tensors)
        x2 = x.reshape(-1, x.shape[-1])
        if not _tiled(parts, x):
            return (x2 @ parts.dequantize(x.dtype).t()).view(*x.shape[:-1], parts.shape[0])
        y = x2.new_empty(x2.shape[0], parts.shape[0])
        for r0, r1, tile in parts.tiles():
            torch.mm(x2, tile.t(), out=y[:, r0:r1])  # a strided out: as fast here as one whole matmul
        return y.view(*x.shape[:-1], parts.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return linear_input_grad(grad, Parts(*ctx.layout, tuple(ctx.saved_tensors))), None


def linear_input_grad(grad: torch.Tensor, weight: torch.Tensor | QuantWeight | Parts) -> torch.Tensor:
    """d(loss)/dx of `linear(x, weight)` given d(loss)/dy = `grad`: grad @ W, a quantized W tile by tile."""
    if not isinstance(weight, QuantWeight | Parts):
        return grad @ weight
    parts = weight.parts() if isinstance(weight, QuantWeight) else weight
    g2 = grad.reshape(-1, grad.shape[-1])
    if not _tiled(parts, grad):
        return (g2 @ parts.dequantize(grad.dtype)).view(*grad.shape[:-1], parts.shape[1])
    gx = g2.new_zeros(g2.shape[0], parts.shape[1])
    for r0, r1, tile in parts.tiles():
        gx.addmm_(g2[:, r0:r1], tile)
    return gx.view(*grad.shape[:-1], parts.shape[1])


def _tiled(parts: Parts, x: torch.Tensor) -> bool:
    return parts.device.type == "cpu" and x.dtype == torch.float32


def linear(x: torch.Tensor, weight: torch.Tensor | QuantWeight | Parts,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a plain or a quantized weight (a module, or the tensors of one in a cache slot): the base
    forward of every Linear memfit wraps."""
    if not isinstance(weight, QuantWeight | Parts):
        return F.linear(x, weight, bias)
    y = _QuantMatmul.apply(x, weight)
    return y if bias is None else y + bias


class QuantLinear(nn.Linear):
    """nn.Linear with a frozen quantized weight; the bias (if any) stays in its own dtype."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape[0], math.prod(weight.shape[1:])
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def reset_parameters(self) -> None:  # nn.Linear's would re-initialise a weight that is not there
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
