"""With a 25% expert budget, peak resident memory is <= 0.35x that of the same model fully in memory.

The model: 4 MoE layers x 16 experts of 3.1 MB (fp32), 201 MB of experts out of 207 MB in all. Each run is
a fresh subprocess (this file run as a script) that loads the model and generates, so its growth counts
only over its own Python + torch baseline.

Page cache excluded: both runs sample the anonymous part of their RSS (RssAnon) every millisecond and take
its peak. File-backed RSS is page cache: transformers maps the safetensors files (for the in-memory model
that is ~200 MB of RSS that is not the model's memory), and both runs touch pages of shared libraries they
had not run yet (~20 MB of file RSS for the offloaded run's loader). The offloaded run must map nothing of
the checkpoint (it reads with preadv into its own memory), which the test checks, so none of its model
bytes can hide in file RSS; its high-water mark with file pages (VmHWM) is reported beside the ratio.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from rss_probe import PeakAnon, kib, run_script

MB = 10**6
PROMPT = list(range(3, 35))


def _config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=1024,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                          num_experts=16, num_experts_per_tok=2, max_position_embeddings=128,
                          tie_word_embeddings=False)


def _worker(mode: str, ckpt: str) -> None:
    """Load the model (offloaded at 25%, or fully in memory) and generate; print memory growth as JSON."""
    torch.set_num_threads(1)
    a = torch.randn(64, 64)
    (a @ a).sum()  # start torch's allocator and thread pool before the baseline
    import transformers  # noqa: F401  (its import costs tens of MB, the same in both modes)

    import memfit.moe

    base_rss, base_anon = kib("VmRSS"), kib("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    with PeakAnon() as peak:
        if mode == "offload":
            model = memfit.moe.load(ckpt, expert_budget="25%")
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=8, min_new_tokens=8,
                                 do_sample=False)
    maps = Path("/proc/self/maps").read_text()
    result = {"tokens": out[0].tolist(), "hwm_growth": (kib("VmHWM") - base_rss) * 1024,
              "anon_growth": (peak.peak - base_anon) * 1024, "maps_checkpoint": str(Path(ckpt).resolve()) in maps}
    if mode == "offload":
        result |= {"memory": model.memfit_moe.memory(), "bytes_read": model.memfit_moe.stats.bytes_read}
    print(json.dumps(result))


def test_peak_rss_at_25_percent_budget(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    assert experts > 0.95 * weights
    model.save_pretrained(tmp_path, max_shard_size="100MB")
    del model

    memory = run_script(__file__, "memory", str(tmp_path))
    offload = run_script(__file__, "offload", str(tmp_path))

    assert offload["tokens"] == memory["tokens"]
    assert memory["anon_growth"] > weights  # the in-memory run really holds the whole model
    assert offload["memory"]["expert_cache"] <= 0.25 * experts
    assert offload["bytes_read"] > offload["memory"]["expert_cache"]  # experts were read again: the budget bit
    assert not offload["maps_checkpoint"]  # no model bytes in file-backed RSS
    ratio = offload["anon_growth"] / memory["anon_growth"]
    assert ratio <= 0.35, (ratio, offload["hwm_growth"] / memory["anon_growth"], offload, memory)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
