"""The memory planner: predicts every component of a run's peak from configs, on fake tensors (no weight read)."""

from memfit.plan.generate import plan_generate, plan_serve
from memfit.plan.predict import Component, Plan, plan_finetune
from memfit.plan.trace import LiveBytes

__all__ = ["Component", "LiveBytes", "Plan", "plan_finetune", "plan_generate", "plan_serve"]
