"""Memory-lean optimizers with the torch.optim API: 8-bit block-wise states, states offloaded to RAM or disk, and
zeroth-order MeZO (no gradients, no states)."""

from memfit.optim.adamw8bit import AdamW8bit
from memfit.optim.mezo import MeZO
from memfit.optim.offload import OffloadAdamW
from memfit.optim.registry import OPTIMIZERS, build_optimizer

__all__ = ["OPTIMIZERS", "AdamW8bit", "MeZO", "OffloadAdamW", "build_optimizer"]
