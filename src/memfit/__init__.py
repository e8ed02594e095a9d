"""memfit: fine-tune, train and run large models in the memory you have."""

from memfit.adapters import (
    AdaLoRAConfig,
    AdapterConfig,
    CompacterConfig,
    DiffFitConfig,
    FullConfig,
    IncreLoRAConfig,
    LoraConfig,
    MoSConfig,
    RPSConfig,
    compress,
    decompress,
    export_peft,
    import_peft,
    inject,
    load_adapter,
    merge,
    rank_allocator,
    rps_footprint,
    save_adapter,
    trainable_parameters,
    unmerge,
)
from memfit.errors import MemfitError
from memfit.optim.apollo import Apollo, ApolloMini
from memfit.optim.galore import GaLore
from memfit.optim.mezo import MeZO
from memfit.tiers.stream import stream_weights

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAConfig",
    "AdapterConfig",
    "Apollo",
    "ApolloMini",
    "CompacterConfig",
    "DiffFitConfig",
    "FullConfig",
    "GaLore",
    "IncreLoRAConfig",
    "LoraConfig",
    "MeZO",
    "MemfitError",
    "MoSConfig",
    "RPSConfig",
    "__version__",
    "compress",
    "decompress",
    "export_peft",
    "import_peft",
    "inject",
    "load_adapter",
    "merge",
    "rank_allocator",
    "rps_footprint",
    "save_adapter",
    "stream_weights",
    "trainable_parameters",
    "unmerge",
]
