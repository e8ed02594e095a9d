"""Memory-lean optimizers with the torch.optim API: 8-bit block-wise states, states offloaded to RAM or disk,
full-parameter training with low-rank states (GaLore, APOLLO, APOLLO-Mini) and zeroth-order MeZO (no gradients,
no states)."""

from memfit.optim.adamw8bit import AdamW8bit
from memfit.optim.apollo import Apollo, ApolloMini
from memfit.optim.galore import GaLore
from memfit.optim.mezo import MeZO
from memfit.optim.offload import OffloadAdamW
from memfit.optim.registry import OPTIMIZERS, build_optimizer

__all__ = ["OPTIMIZERS", "AdamW8bit", "Apollo", "ApolloMini", "GaLore", "MeZO", "OffloadAdamW", "build_optimizer"]
