"""Block-quantized frozen weights (NF4, int8): QLoRA-style bases that adapters train on."""

from memfit.quant.codebooks import CODEBOOKS
from memfit.quant.linear import QuantLinear, QuantWeight, linear
from memfit.quant.model import HEADS, QuantConfig, dequantize, quantize, quantize_weight, quantized_modules

__all__ = ["CODEBOOKS", "HEADS", "QuantConfig", "QuantLinear", "QuantWeight", "dequantize", "linear",
           "quantize", "quantize_weight", "quantized_modules"]
