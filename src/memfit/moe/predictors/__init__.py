"""Routing predictors: a registry of training-free ones by name, and trained ones loaded from files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from memfit.errors import ConfigError
from memfit.moe.arch import MoeArch
from memfit.moe.predictors.base import Prediction, Predictor
from memfit.moe.predictors.cross_layer import CrossLayerGate
from memfit.moe.predictors.routing_path import PredictorConfig, RoutingPath, RoutingPathNet

__all__ = ["PREDICTORS", "CrossLayerGate", "Prediction", "Predictor", "PredictorConfig", "RoutingPath",
           "RoutingPathNet", "make_predictor"]

# name -> factory(layers {index: decoder layer}, arch)
PREDICTORS: dict[str, Callable[[dict[int, nn.Module], MoeArch], Predictor]] = {
    CrossLayerGate.name: lambda layers, arch: CrossLayerGate(layers, arch),
}


def make_predictor(spec: str | Path | Predictor | None, layers: dict[int, nn.Module], arch: MoeArch,
                   fingerprint: Callable[[], str]) -> Predictor | None:
    """None/"none": no prediction; a registered name; a Predictor; or the path of a trained routing-path file
    (checked against the model's `fingerprint()`)."""
    if spec is None or spec == "none":
        return None
    if isinstance(spec, Predictor):
        predictor = spec
    elif isinstance(spec, str) and spec in PREDICTORS:
        return PREDICTORS[spec](layers, arch)
    elif Path(spec).is_file():
        predictor = RoutingPath.load(spec)
    else:
        raise ConfigError(f"unknown predictor {str(spec)!r}: give one of {sorted(PREDICTORS)}, 'none', or the path of "
                          "a routing-path predictor file (from `memfit moe train-predictor`).")
    if isinstance(predictor, RoutingPath):
        predictor.check(fingerprint())
        if predictor.layers != sorted(layers):
            raise ConfigError(f"the predictor covers MoE layers {predictor.layers}, the model has {sorted(layers)}.")
    return predictor
