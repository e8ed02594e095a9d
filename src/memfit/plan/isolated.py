"""Planning in a fresh process, for a run in this one: tracing leaves ~30 MB resident that the run would carry.

`python -m memfit.plan SPEC` plans (or, with "memory", fits) the run SPEC describes (JSON: a fine-tune's model,
adapter, train, task, labels, device; or a generation's model, serve config and shape) and prints the result as one
JSON line; the child imports what the CLI imports, so its resident set before the model is the run's.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Any

from memfit.adapters import AdapterConfig
from memfit.adapters.registry import config_from_dict
from memfit.errors import ConfigError, MemfitError
from memfit.serve.loading import ServeConfig
from memfit.train.config import TrainConfig


def plan_isolated(model_dir: str, adapter: AdapterConfig, train: TrainConfig, task: str,
                  labels: list[str] | None, device: str | None, memory: str | None = None) -> dict[str, Any]:
    """{"plan": Plan.to_dict()} (and, with `memory`, "train" and "changes" of the settings chosen); a planning
    error is raised here as the ConfigError it was."""
    return _run({"kind": "finetune", "model": str(model_dir), "adapter": adapter.to_dict(), "train": train.to_dict(),
                 "task": task, "labels": labels, "device": device, "memory": memory})


def plan_generate_isolated(model_dir: str, config: ServeConfig, prompt_tokens: int, new_tokens: int,
                           prompts: int, memory: str | None = None) -> dict[str, Any]:
    """{"plan": Plan.to_dict()} of `memfit generate` (see `plan_generate`), planned in a fresh process; with
    `memory`, also "serve" and "changes" of the settings `fit_serving` chose."""
    return _run({"kind": "generate", "model": str(model_dir), "serve": dataclasses.asdict(config),
                 "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "prompts": prompts, "memory": memory})


def plan_serve_isolated(model_dir: str, config: ServeConfig, memory: str | None = None) -> dict[str, Any]:
    """{"plan": Plan.to_dict()} of `memfit serve` at its limits (see `plan_serve`), planned in a fresh process;
    with `memory`, as `plan_generate_isolated`."""
    return _run({"kind": "serve", "model": str(model_dir), "serve": dataclasses.asdict(config), "memory": memory})


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "memfit.plan", json.dumps(spec)], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the planning process failed: {proc.stderr.strip()[-500:]}")
    out = json.loads(lines[-1])
    if "error" in out:
        raise ConfigError(out["error"])
    return out


def main(spec_text: str) -> None:
    import memfit.cli  # noqa: F401  (the run's imports, so the resident set measured is the run's)
    from memfit.plan.generate import plan_generate, plan_serve
    from memfit.plan.predict import plan_finetune
    from memfit.plan.search import fit_memory, fit_serving

    spec = json.loads(spec_text)
    try:
        if spec["kind"] in ("serve", "generate"):
            config = ServeConfig(**spec["serve"])
            shape = (spec["prompt_tokens"], spec["new_tokens"], spec["prompts"]) if spec["kind"] == "generate" \
                else None
            if spec["memory"] is not None:
                fit = fit_serving(spec["model"], config, spec["memory"], shape)
                out = {"plan": fit.plan.to_dict(), "serve": dataclasses.asdict(fit.config), "changes": fit.changes}
            elif shape is None:
                out = {"plan": plan_serve(spec["model"], config).to_dict()}
            else:
                out = {"plan": plan_generate(spec["model"], config, *shape).to_dict()}
        else:
            adapter, train = config_from_dict(spec["adapter"]), TrainConfig.from_dict(spec["train"])
            args = {"task": spec["task"], "labels": spec["labels"], "device": spec["device"]}
            if spec["memory"] is None:
                out = {"plan": plan_finetune(spec["model"], adapter, train, **args).to_dict()}
            else:
                fit = fit_memory(spec["model"], adapter, train, spec["memory"], **args)
                out = {"plan": fit.plan.to_dict(), "train": fit.train.to_dict(), "changes": fit.changes}
    except MemfitError as e:
        out = {"error": str(e)}
    print(json.dumps(out))
