"""ExpertFlow's routing-path predictor: from a token's state at the first MoE layer, every later layer's experts.

Input: the residual stream entering the first MoE layer (token embedding plus the first attention over
the context). Output: per later MoE layer, one logit per expert; trained with binary cross-entropy on
routing traces (targets: the k experts each layer chose). At run time it predicts the whole routing path
of a step before the first expert runs, so reads for every layer start at once, in layer order.

    x [N, H] -> LayerNorm -> Linear(H, W) -> GELU -> Linear(W, W) -> GELU -> Linear(W, L'E) -> [N, L', E]

Files: safetensors of the weights, with the model's fingerprint and the shape in the metadata.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from memfit.errors import CheckpointError, ConfigError
from memfit.moe.predictors.base import Prediction, Predictor
from memfit.moe.trace import Trace
from memfit.tiers.files import load_tensors, save_tensors

FORMAT = "memfit-routing-path-1"


class RoutingPathNet(nn.Module):
    def __init__(self, hidden: int, layers: int, experts: int, width: int = 512) -> None:
        super().__init__()
        self.layers, self.experts = layers, experts
        self.net = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, width),
                                 nn.GELU(), nn.Linear(width, layers * experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, self.layers, self.experts)  # [N, L', E] logits


@dataclass
class PredictorConfig:
    """How `RoutingPath.train` fits the predictor (not `memfit.train.config.TrainConfig`, which is the fine-tuning
    loop's)."""

    width: int = 512
    epochs: int = 8
    lr: float = 2e-3
    batch_size: int = 512
    weight_decay: float = 0.01
    holdout: float = 0.1  # share of the trace's tokens (its tail) kept out of training to report accuracy
    seed: int = 0


def topk_accuracy(logits: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """Per layer: the mean share of each token's k chosen experts found among its k predicted ones.
    logits [N, L', E], routes [N, L', k] -> [L']."""
    k = routes.shape[-1]
    pred = logits.topk(k, dim=-1).indices  # [N, L', k]
    hits = (pred.unsqueeze(-1) == routes.long().unsqueeze(-2)).any(-2).float()  # [N, L', k]
    return hits.mean(dim=(0, 2))


def _warmup_cosine(step: int, steps: int) -> float:
    """Learning-rate factor: linear warmup over the first 10% of steps, then cosine decay to 0."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def _targets(routes: torch.Tensor, experts: int) -> torch.Tensor:
    """Multi-hot [N, L', E] from chosen experts [N, L', k]."""
    out = torch.zeros(*routes.shape[:-1], experts)
    return out.scatter_(-1, routes.long(), 1.0)


class RoutingPath(Predictor):
    """A trained routing-path net bound to one model (by fingerprint)."""

    name = "routing-path"

    def __init__(self, net: RoutingPathNet, layers: list[int], top_k: int, fingerprint: str,
                 accuracy: list[float] | None = None) -> None:
        self.net, self.layers, self.top_k, self.fingerprint = net.eval(), layers, top_k, fingerprint
        self.accuracy = accuracy or []

    @torch.no_grad()
    def predict(self, layer: int, residual: torch.Tensor) -> list[Prediction]:
        if layer != self.layers[0]:
            return []
        probs = torch.sigmoid(self.net(residual.float()))  # [N, L', E]
        topk = probs.topk(self.top_k, dim=-1).indices
        return [Prediction(l, topk[:, i], probs[:, i]) for i, l in enumerate(self.layers[1:])]

    # -- training ------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, trace: Trace, config: PredictorConfig | None = None, progress=None) -> RoutingPath:
        """Fit on the head of `trace`; `accuracy` is measured on its held-out tail (per later layer)."""
        config = config or PredictorConfig()
        if len(trace.layers) < 2:
            raise ConfigError("the model has one MoE layer: there is no later layer for a routing path to predict.")
        n_test = int(trace.tokens * config.holdout)
        n_train = trace.tokens - n_test
        if n_train < config.batch_size:
            raise ConfigError(f"the trace has {trace.tokens} tokens, too few to train on ({n_train} after holding "
                              f"out {config.holdout:.0%}); record a trace of more text.")
        torch.manual_seed(config.seed)
        x, routes = trace.features, trace.routes[:, 1:]
        k = routes.shape[-1]
        net = RoutingPathNet(x.shape[1], routes.shape[1], trace.num_experts, config.width)
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps = config.epochs * (n_train // config.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup_cosine, steps=steps))
        gen = torch.Generator().manual_seed(config.seed)
        for _ in range(config.epochs):
            order = torch.randperm(n_train, generator=gen)
            for i in range(n_train // config.batch_size):
                idx = order[i * config.batch_size: (i + 1) * config.batch_size]
                logits = net(x[idx].float())
                loss = F.binary_cross_entropy_with_logits(logits, _targets(routes[idx], trace.num_experts))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if progress is not None:
                    progress(loss.item())
        net.eval()
        accuracy = cls._evaluate(net, x[n_train:], routes[n_train:]) if n_test else []
        return cls(net, trace.layers, k, trace.fingerprint, accuracy)

    @staticmethod
    @torch.no_grad()
    def _evaluate(net: RoutingPathNet, x: torch.Tensor, routes: torch.Tensor) -> list[float]:
        logits = torch.cat([net(x[i: i + 4096].float()) for i in range(0, x.shape[0], 4096)])
        return topk_accuracy(logits, routes).tolist()

    @torch.no_grad()
    def accuracy_on(self, trace: Trace) -> list[float]:
        """Per later layer accuracy on another trace of the same model (e.g. held-out text)."""
        self.check(trace.fingerprint, "trace")
        return self._evaluate(self.net, trace.features, trace.routes[:, 1:])

    # -- files ---------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        hidden, width = self.net.net[1].in_features, self.net.net[1].out_features
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "layers": json.dumps(self.layers),
                "top_k": str(self.top_k), "num_experts": str(self.net.experts), "hidden": str(hidden),
                "width": str(width), "accuracy": json.dumps(self.accuracy)}
        return save_tensors(path, self.net.state_dict(), meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingPath:
        path = Path(path)
        tensors = load_tensors(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a memfit routing-path predictor; train one with "
                                  "`memfit moe train-predictor`.")
        layers = json.loads(meta["layers"])
        net = RoutingPathNet(int(meta["hidden"]), len(layers) - 1, int(meta["num_experts"]), int(meta["width"]))
        try:
            net.load_state_dict(tensors)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: the weights do not match the shape in its metadata ({e}).") from e
        return cls(net, layers, int(meta["top_k"]), meta["fingerprint"], json.loads(meta.get("accuracy", "[]")))

    def check(self, fingerprint: str, what: str = "model") -> None:
        if fingerprint != self.fingerprint:
            raise ConfigError(
                f"this routing-path predictor was trained for another model (fingerprint {self.fingerprint}); the "
                f"{what} has fingerprint {fingerprint}. Record a trace of this model (`memfit moe trace`) and train "
                "a predictor on it (`memfit moe train-predictor`)."
            )
