"""Tasks: how rows become token batches, which HF head a model gets, how loss and metrics are computed.

A task computes a *summed* loss and the number of targets it sums over, so the trainer can normalise by
the targets of the whole (accumulated, multi-rank) batch: the update then equals the one a single large
batch would give, whatever the split.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import DataError
from memfit.train.data import Row
from memfit.train.loss import IGNORE, token_losses


@dataclass
class EvalState:
    """What an evaluation accumulates over batches."""

    loss_sum: float = 0.0
    count: int = 0
    predictions: list[int] | None = None
    targets: list[int] | None = None


class Task(ABC):
    """Base of the registered tasks. `labels` is the class vocabulary (classification) or None."""

    name = ""
    auto_class = ""

    def __init__(self, labels: list[str] | None = None) -> None:
        self.labels = labels

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def encode(self, row: Row, tokenizer, max_length: int) -> dict[str, list[int]]:
        """Token ids of one row (and what `_labels` needs), at most `max_length` long."""

    def collate(self, examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": self._labels(examples, length)}

    @abstractmethod
    def _labels(self, examples: list[dict[str, list[int]]], length: int) -> torch.Tensor:
        """The batch's label tensor."""

    @abstractmethod
    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        """How many targets the loss of `batch` sums over."""

    @abstractmethod
    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor], state: EvalState | None = None
                 ) -> torch.Tensor:
        """The summed loss over the batch's targets; with `state`, also accumulate what metrics need."""

    @abstractmethod
    def example_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss of each example, [batch]: MeZO's paired passes split one forward into two losses."""

    def metrics(self, state: EvalState) -> dict[str, float]:
        return {"loss": state.loss_sum / max(1, state.count)}


class CausalLM(Task):
    """Next-token prediction; {"prompt", "completion"} rows put the loss on the completion only."""

    name, auto_class = "causal-lm", "AutoModelForCausalLM"

    def encode(self, row: Row, tokenizer, max_length: int) -> dict[str, list[int]]:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if "prompt" in row.data:
            prompt = tokenizer(row.data["prompt"])["input_ids"]
            completion = tokenizer(row.data["completion"], add_special_tokens=False)["input_ids"] + eos
            completion = completion[: max(1, max_length - len(prompt))]
            prompt = prompt[: max_length - len(completion)]
            return {"input_ids": prompt + completion, "n_prompt": [len(prompt)]}
        ids = tokenizer(row.data["text"])["input_ids"][:max_length]
        return {"input_ids": ids, "n_prompt": [0]}

    def _labels(self, examples: list[dict[str, list[int]]], length: int) -> torch.Tensor:
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            start, n = e["n_prompt"][0], len(e["input_ids"])
            labels[i, start:n] = torch.tensor(e["input_ids"][start:n])
        return labels

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def example_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_losses(model, batch, "none").view(batch["input_ids"].shape[0], -1).sum(1)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor], state: EvalState | None = None
                 ) -> torch.Tensor:
        loss = token_losses(model, batch, "sum")
        if state is not None:
            state.loss_sum += loss.item()
            state.count += self.targets(batch)
        return loss

    def metrics(self, state: EvalState) -> dict[str, float]:
        loss = state.loss_sum / max(1, state.count)
        return {"loss": loss, "perplexity": float(torch.tensor(loss).exp())}


class Classify(Task):
    """Sequence classification with a new head; metrics add accuracy and macro-F1."""

    name, auto_class = "classify", "AutoModelForSequenceClassification"

    def model_kwargs(self) -> dict[str, Any]:
        labels = self.labels or []
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}}

    def encode(self, row: Row, tokenizer, max_length: int) -> dict[str, list[int]]:
        ids = tokenizer(row.data["text"], truncation=True, max_length=max_length)["input_ids"]
        label = str(row.data["label"])
        if label not in (self.labels or []):
            raise DataError(f"line {row.line}: label {label!r} was not seen in the training data.")
        return {"input_ids": ids, "label": [self.labels.index(label)]}

    def _labels(self, examples: list[dict[str, list[int]]], length: int) -> torch.Tensor:
        return torch.tensor([e["label"][0] for e in examples], dtype=torch.long)

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    def _logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    def example_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch), batch["labels"], reduction="none")

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor], state: EvalState | None = None
                 ) -> torch.Tensor:
        logits = self._logits(model, batch)
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        if state is not None:
            state.loss_sum += loss.item()
            state.count += self.targets(batch)
            state.predictions = (state.predictions or []) + logits.argmax(-1).tolist()
            state.targets = (state.targets or []) + batch["labels"].tolist()
        return loss

    def metrics(self, state: EvalState) -> dict[str, float]:
        return {**super().metrics(state), **classification_metrics(state.predictions or [], state.targets or [],
                                                                    len(self.labels or []))}


def classification_metrics(predictions: list[int], targets: list[int], num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean of per-class F1 over classes that occur in targets or predictions)."""
    pred, true = torch.tensor(predictions, dtype=torch.long), torch.tensor(targets, dtype=torch.long)
    if true.numel() == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    confusion = torch.bincount(true * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    tp = confusion.diag().double()
    support, predicted = confusion.sum(1).double(), confusion.sum(0).double()
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    present = (support + predicted) > 0
    return {"accuracy": float(tp.sum() / true.numel()), "macro_f1": float(f1[present].mean())}


TASKS: dict[str, type[Task]] = {task.name: task for task in (CausalLM, Classify)}
