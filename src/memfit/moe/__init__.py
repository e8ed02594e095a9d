"""Offloaded MoE inference: experts read from the checkpoint's safetensors into a byte-budgeted cache,
predicted and prefetched before they are needed (ExpertFlow, HybriMoE, Fate, mixtral-offloading).

    model = memfit.moe.load("path/to/mixtral", expert_budget="25%", policy="predictive", predictor="cross-layer")
    model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)
    print(model.memfit_moe.stats.hit_ratio)
"""

from memfit.moe.arch import ARCHS, MoeArch, register
from memfit.moe.loader import load
from memfit.moe.policies import POLICIES
from memfit.moe.predictors import PREDICTORS, CrossLayerGate, PredictorConfig, RoutingPath
from memfit.moe.trace import Trace

__all__ = ["ARCHS", "POLICIES", "PREDICTORS", "CrossLayerGate", "MoeArch", "PredictorConfig", "RoutingPath", "Trace",
           "load", "register"]
