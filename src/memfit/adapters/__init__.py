"""Parameter-efficient adapters: one file per method, listed in the registry, generic operations over them."""

from memfit.adapters.adalora import AdaLoRAConfig
from memfit.adapters.adaptive import RankAllocator, rank_allocator
from memfit.adapters.compacter import CompacterConfig
from memfit.adapters.config import AdapterConfig
from memfit.adapters.difffit import DiffFitConfig
from memfit.adapters.full import FullConfig
from memfit.adapters.increlora import IncreLoRAConfig
from memfit.adapters.io import load_adapter, save_adapter
from memfit.adapters.lora import LoraConfig
from memfit.adapters.model import adapter_state_dict, inject, merge, trainable_parameters, unmerge
from memfit.adapters.mos import MoSConfig
from memfit.adapters.peft_format import export_peft, import_peft
from memfit.adapters.registry import config_from_dict, get_method, methods, register_method
from memfit.adapters.rps import RPSConfig, compress, decompress, rps_footprint

__all__ = [
    "AdaLoRAConfig",
    "AdapterConfig",
    "CompacterConfig",
    "DiffFitConfig",
    "FullConfig",
    "IncreLoRAConfig",
    "LoraConfig",
    "MoSConfig",
    "RPSConfig",
    "RankAllocator",
    "adapter_state_dict",
    "compress",
    "config_from_dict",
    "decompress",
    "export_peft",
    "get_method",
    "import_peft",
    "inject",
    "load_adapter",
    "merge",
    "methods",
    "rank_allocator",
    "register_method",
    "rps_footprint",
    "save_adapter",
    "trainable_parameters",
    "unmerge",
]
