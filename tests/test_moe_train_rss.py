"""A LoRA fine-tune with a 25% expert budget peaks at <= 0.35x the anonymous RSS of the same fine-tune in memory.

The model is test_moe_rss's (4 MoE layers x 16 experts, 201 MB of experts out of 207 MB). Each run is a fresh
subprocess (this file run as a script) that loads the model, puts LoRA on the attention projections and takes
three AdamW steps; its peak RssAnon over its own baseline is compared. Page cache is excluded as in
test_moe_rss, and the offloaded run must map no byte of the checkpoint, so none of its model bytes can hide in
file-backed RSS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from rss_probe import PeakAnon, kib, run_script
from test_moe_rss import _config

STEPS = 3


def _worker(mode: str, ckpt: str) -> None:
    """Fine-tune (experts offloaded at 25%, or fully in memory); print memory growth and losses as JSON."""
    torch.set_num_threads(1)
    a = torch.randn(64, 64, requires_grad=True)
    (a @ a).sum().backward()  # start torch's allocator, thread pool and autograd engine before the baseline
    import transformers  # noqa: F401  (its import costs tens of MB, the same in both modes)

    import memfit
    import memfit.moe

    base_anon = kib("RssAnon")
    with PeakAnon() as peak:
        if mode == "offload":
            model = memfit.moe.load(ckpt, expert_budget="25%")
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(ckpt)
        torch.manual_seed(0)
        memfit.inject(model, memfit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(STEPS):
            ids = torch.randint(3, 512, (2, 32), generator=g)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    maps = Path("/proc/self/maps").read_text()
    result = {"losses": losses, "anon_growth": (peak.peak - base_anon) * 1024,
              "maps_checkpoint": str(Path(ckpt).resolve()) in maps}
    if mode == "offload":
        rt = model.memfit_moe
        result |= {"memory": rt.memory(), "bytes_read": rt.stats.bytes_read, "phases": rt.phase_summary()}
    print(json.dumps(result))


def test_offloaded_finetune_peak_rss_at_25_percent_budget(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    model.save_pretrained(tmp_path, max_shard_size="100MB")
    del model

    memory = run_script(__file__, "memory", str(tmp_path), timeout=600)
    offload = run_script(__file__, "offload", str(tmp_path), timeout=600)

    torch.testing.assert_close(torch.tensor(offload["losses"]), torch.tensor(memory["losses"]), rtol=1e-5, atol=0)
    assert memory["anon_growth"] > weights  # the in-memory run really holds the whole model
    assert offload["memory"]["expert_cache"] <= 0.25 * experts
    assert offload["bytes_read"] > offload["memory"]["expert_cache"]  # experts were read again: the budget bit
    assert not offload["maps_checkpoint"]
    ratio = offload["anon_growth"] / memory["anon_growth"]
    assert ratio <= 0.35, (ratio, offload, memory)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
