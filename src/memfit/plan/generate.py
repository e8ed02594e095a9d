"""The memory plan of `memfit generate` and `memfit serve`: the engine's own steps, traced on a fake model.

The base is built as the run builds it (fp32, quantized at load, or a `memfit quantize` checkpoint) on fake tensors
and wrapped for adapter slots by `build_engine` itself, and the engine runs requests of the planned shape under
`LiveBytes`: so the KV cache, the prefill's activations and a decode step's temporaries are the bytes the engine's
code allocates (the cache's layout, its append by concatenation, the attention implementation), not a formula.

Two traces bound a generation: the prefill of the batch's prompts (its activations peak there), and the last decode
step, whose cache is the longest (prompt + max_new_tokens - 1 columns): that one is traced by prefilling prompts of
that length minus one and decoding once, so a plan costs four forward passes of shape propagation, whatever the
number of tokens. A server's shapes are its limits: --kv-budget tokens in the batch, as --max-seqs rows or as
one long request, whichever needs more.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from memfit.errors import ConfigError
from memfit.local import load_config
from memfit.local import model_dir as local_dir
from memfit.plan.components import Component, Plan
from memfit.plan.offload import plan_offload, resident
from memfit.plan.predict import ALLOCATOR_NOTE, fake_base, runtime_bytes, weights_note
from memfit.plan.trace import LiveBytes
from memfit.serve.engine import Engine, Request, SamplingParams
from memfit.serve.loading import ServeConfig, build_engine, serve_device
from memfit.tiers.memory import storage_bytes


def plan_generate(model_dir: str | os.PathLike, config: ServeConfig, prompt_tokens: int, new_tokens: int,
                  prompts: int = 1, device: str | None = None, runtime: int | None = None) -> Plan:
    """Predict the peak memory of `memfit generate` for `prompts` prompts of at most `prompt_tokens` tokens, each
    generating `new_tokens` (the engine batches min(prompts, --max-seqs, what --kv-budget admits) at once).

    runtime: the runtime's resident bytes when measured already; by default this process's, with the tokenizer
        loaded (plan in a fresh process, `python -m memfit.plan`, for a run in this one)."""
    reserve = prompt_tokens + new_tokens
    if prompt_tokens < 1 or new_tokens < 1 or prompts < 1:
        raise ConfigError("plan a generation of at least one prompt of one token and one new token.")
    if reserve > config.kv_budget:
        raise ConfigError(f"a request of {prompt_tokens} + {new_tokens} tokens is above --kv-budget "
                          f"{config.kv_budget}; raise it or shorten the request.")
    rows = min(prompts, config.max_seqs, config.kv_budget // reserve)
    return _plan(model_dir, config, [(rows, prompt_tokens, new_tokens)], device, runtime,
                 f"{rows} rows of {prompt_tokens} + {new_tokens} tokens")


def plan_serve(model_dir: str | os.PathLike, config: ServeConfig, device: str | None = None,
               runtime: int | None = None) -> Plan:
    """Predict the peak memory of `memfit serve` at its limits: --kv-budget tokens of cache, held by --max-seqs
    rows of equal length or by one request as long as the model's context allows (its prefill's activations are
    the larger), each finishing its last token."""
    context = getattr(load_config(local_dir(model_dir, weights=False)), "max_position_embeddings", None)
    longest = min(config.kv_budget, context or config.kv_budget)
    if longest < 3:
        raise ConfigError(f"--kv-budget {config.kv_budget} leaves no room for a request; raise it.")
    per_row = min(config.kv_budget // config.max_seqs, longest)
    shapes = [(1, longest - 2, 2)] + ([(config.max_seqs, per_row - 2, 2)] if per_row >= 3 else [])
    return _plan(model_dir, config, shapes, device, runtime,
                 f"--kv-budget {config.kv_budget} tokens: 1 x {longest} or {config.max_seqs} x {per_row}",
                 serving=True)


def _plan(model_dir: str | os.PathLike, config: ServeConfig, shapes: list[tuple[int, int, int]],
          device: str | None, runtime: int | None, shape_note: str, serving: bool = False) -> Plan:
    if config.quantize is not None and config.quantize not in ("nf4", "int8"):
        raise ConfigError(f"--quantize must be nf4 or int8, got {config.quantize!r}.")
    if config.quantize is not None and (config.weights_budget is not None or config.expert_budget is not None):
        raise ConfigError("--quantize does not combine with --weights-budget or --expert-budget (weights are read "
                          "per use in their stored dtype); write the quantized checkpoint once (memfit quantize "
                          "--model M --out DIR) and plan DIR as --model.")
    root = local_dir(model_dir, weights=False)
    dev = serve_device(config, device)
    if serving and runtime is None:  # the server's own imports are part of its runtime
        import uvicorn  # noqa: F401

        import memfit.serve.app  # noqa: F401
    overhead = runtime_bytes(root, dev, runtime)
    from transformers import AutoModelForCausalLM

    model, _, mode = fake_base(root, AutoModelForCausalLM, load_config(root), dev, config.quantize)
    with mode, torch.device(dev):
        streamed, offloaded = plan_offload(model, root, config.weights_budget, config.expert_budget, training=False)
    weights = storage_bytes(resident([*model.parameters(), *model.buffers()], streamed))
    note = weights_note(model)
    base = storage_bytes([*model.parameters(), *model.buffers()])  # the slots are what the wrapping adds
    engine, _, _ = build_engine(root, replace(config, device=str(dev)), model=model)
    engine.eos_ids = set()  # a fake token is always 1: never let it end a request early
    held = [*model.parameters(), *model.buffers()]
    slots = storage_bytes(held) - base
    host = engine.adapters.host_bytes() if engine.adapters is not None else 0
    adapter = next(iter(config.adapters or {}), None)
    kv, top = 0, 0
    with mode, torch.device(dev):
        for rows, prompt, new in shapes:
            kv_end, prefill = _trace(engine, held, adapter, rows, prompt, 1)
            if new > 1:
                kv_end, decode = _trace(engine, held, adapter, rows, prompt + new - 2, 2)
            else:
                decode = 0
            if max(prefill, decode) > top:
                kv, top = kv_end, max(prefill, decode)
    parts = ([Component("runtime", overhead, "this process's resident set before the model: interpreter, torch, "
                        "transformers, memfit, the tokenizer" + (", the HTTP server" if serving else ""))]
             if dev.type == "cpu" else [])
    parts += [Component("weights resident", weights, note), *offloaded]
    if engine.adapters is not None:
        parts += [Component("adapter slots", slots, f"{config.max_loras} slots on the device"),
                  Component("adapters in host memory", host, "the adapters given at start, as read")]
    parts += [Component("KV cache", kv, shape_note + ", at the last token"),
              Component("activations", max(0, top - kv), "above the cache: the prefill's, or a decode step's "
                        "(the cache's append copies it layer by layer)")]
    notes = [ALLOCATOR_NOTE] if dev.type == "cpu" and not config.lean_allocator else []
    return Plan(parts, sum(c.bytes for c in parts), str(dev), notes)


def _trace(engine: Engine, held: list[torch.Tensor], adapter: str | None, rows: int, prompt: int,
           new: int) -> tuple[int, int]:
    """(KV-cache bytes at the last token, peak bytes) of `rows` requests of `prompt` tokens generating `new`;
    with new > 1 the peak is that of the decode steps alone (the prefill's is the other trace's)."""
    emitted, state = [0], {"kv": 0}
    with LiveBytes(held) as live:
        def on_token(token: int) -> None:
            emitted[0] += 1
            state["kv"] = engine.kv_bytes()
            if emitted[0] == rows and new > 1:  # every row prefilled: the decode starts from here
                live.mark()

        for _ in range(rows):
            engine.submit(Request([0] * prompt, SamplingParams(max_new_tokens=new), adapter, on_token))
        engine.run_until_done()
    return state["kv"], live.peak
