"""README.md's benchmark tables trace to results/*.json: bench/readme_check.py, and each bench script's renderer.

The synthetic payloads below copy their numbers from README rows, so each renderer is held to the README's
columns and number formats, not only to running without error.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
README = ROOT / "README.md"
RESULTS = ROOT / "results"
MiB = 2**20


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_test_readme_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


readme_check = _load("readme_check")
REFERENCED = sorted({b.file for b in readme_check.blocks(README.read_text().splitlines())})


@pytest.mark.skipif(not any((RESULTS / f).is_file() for f in REFERENCED),
                    reason=f"results/ holds none of the README's results files ({', '.join(REFERENCED)}): "
                           "not committed yet")
def test_readme_tables_match_committed_results():
    assert readme_check.check(README, RESULTS) == []


def test_readme_marks_the_benchmark_tables():
    assert REFERENCED == ["adapters_step.json", "moe.json", "moe_train.json", "optim-zen4.json", "optim.json",
                          "optim_ab.json", "optim_ab_gathers.json", "optim_finetune.json", "optim_full.json",
                          "plan.json",
                          "quality-llm-300steps.json", "quality-llm-synopses-300steps.json",
                          "quality-llm-synopses-experiments.json", "quality-llm-synopses.json", "quality-llm.json",
                          "quality-lm.json", "quality.json", "quantize.json", "rps.json", "serve.json", "stream.json",
                          "zo.json"]


# --- the mechanism, on a README and results of its own ---------------------------------------------------------


def _demo(payload: dict) -> dict[str, str]:
    return {"speed": f"| variant | tok/s |\n|---|---:|\n| ours | {payload['tok_s']:.1f} |"}


def _readme(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "README.md"
    path.write_text(f"# demo\n\nprose\n\n<!-- results/demo.json: speed -->\n| variant | tok/s |\n|---|---:|\n"
                    f"| ours | {value} |   \n<!-- /results -->\n\nmore prose\n")
    return path


def test_check_reports_a_changed_number_and_write_fixes_it(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "demo.json").write_text(json.dumps({"tok_s": 35.54}))
    renderers = {"demo.json": _demo}
    assert readme_check.check(_readme(tmp_path, "35.5"), results, renderers) == []  # trailing blanks do not count

    readme = _readme(tmp_path, "36.0")
    problems = readme_check.check(readme, results, renderers)
    assert len(problems) == 1
    assert "README.md:8:" in problems[0] and "demo.json" in problems[0] and "speed" in problems[0]
    assert "'| ours | 36.0 |'" in problems[0] and "'| ours | 35.5 |'" in problems[0]

    assert readme_check.write(readme, results, renderers) == []
    assert readme_check.check(readme, results, renderers) == []
    assert readme.read_text() == _readme(tmp_path, "35.5").read_text().replace(" |   \n", " |\n")


def test_check_reports_missing_results_unknown_tables_and_bad_markers(tmp_path):
    readme = _readme(tmp_path, "35.5")
    results = tmp_path / "results"
    results.mkdir()
    assert "missing results file" in " ".join(readme_check.check(readme, results, {"demo.json": _demo}))
    assert readme_check.write(readme, results, {"demo.json": _demo}) != []  # nothing to write it from
    assert "| ours | 35.5 |" in readme.read_text()

    (results / "demo.json").write_text(json.dumps({"tok_s": 35.5}))
    other = {"demo.json": lambda p: {"other": ""}}
    assert "no such table" in " ".join(readme_check.check(readme, results, other))

    readme.write_text(readme.read_text().replace("<!-- /results -->\n", ""))
    assert "never closed" in " ".join(readme_check.check(readme, results, {"demo.json": _demo}))


def test_command_line_write_and_check_with_a_bench_script(tmp_path, capsys):
    """The default renderers: the bench script named by the results file (here bench/optim_finetune.py)."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "optim_finetune.json").write_text(json.dumps(PAYLOADS["optim_finetune.json"]))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results/optim_finetune.json: finetune -->\n| stale |\n<!-- /results -->\n")
    args = ["--readme", str(readme), "--results", str(results)]
    assert readme_check.main(args) == 1
    assert "table line 1" in capsys.readouterr().err
    assert readme_check.main([*args, "--write"]) == 0
    assert readme_check.main(args) == 0
    assert capsys.readouterr().out.endswith("README tables match results/\n")
    assert "| memfit AdamW8bit | 0.8310 | 0.755 | 0.709 | -0.07% |" in readme.read_text()


# --- every bench script's renderer, on a minimal payload of the structure its main() writes ----------------------

def _llm_runs(row: str, ems: list[float], finals: list[float], variant: str = "") -> dict:
    """bench/quality_llm.py's runs of one row: a sweep over its rates (one exact match each), then final seeds at
    the best rate (or, for an ablation variant, final seeds alone)."""
    lrs = {"LoRA r=1": (3e-4, 1e-3, 3e-3, 1e-2), "MoS, LoRA r=2 budget (active rank 16)": (3e-4, 1e-3, 3e-3, 1e-2)}[row]
    params = {"LoRA r=1": 305_280, "MoS, LoRA r=2 budget (active rank 16)": 610_560}[row]
    runs = {} if variant else {f"{row}||sweep|{lr:g}|0": {"exact_match": em, "loss": 0.5, "trainable_params": params,
                                                          "train_time_s": 300.0, "lr": lr, "seed": 0}
                               for lr, em in zip(lrs, ems, strict=True)}
    best = lrs[ems.index(max(ems))] if ems else 3e-3
    runs.update({f"{row}|{variant}|final|{best:g}|{seed}": {"exact_match": em, "loss": 0.4 + seed / 100,
                                                            "trainable_params": params, "train_time_s": 300.0,
                                                            "lr": best, "seed": seed}
                 for seed, em in enumerate(finals)})
    return runs


MOS2 = "MoS, LoRA r=2 budget (active rank 16)"
PAYLOADS = {
    "quality-llm.json": {"protocol": {"steps": 100}, "runs": {
        "zero-shot||final|0|0": {"exact_match": 0.0, "loss": 12.79, "trainable_params": 0, "train_time_s": 0.0,
                                 "lr": 0.0, "seed": 0},
        **_llm_runs("LoRA r=1", [0.5, 0.6, 0.7, 0.76], [0.72, 0.718]),
        **_llm_runs(MOS2, [0.6, 0.7, 0.77, 0.3], [0.72, 0.70]),
        **_llm_runs(MOS2, [], [0.733], variant="no subset selection")}},
    "quality-llm-300steps.json": {"protocol": {"steps": 300}, "runs": _llm_runs("LoRA r=1", [0.5, 0.6, 0.7, 0.76],
                                                                               [0.77, 0.7875])},
    "quality-llm-synopses.json": {"protocol": {"task": "synopses", "steps": 100}, "runs": {
        "zero-shot||final|0|0": {"loss": 5.42, "trainable_params": 0, "train_time_s": 0.0, "lr": 0.0, "seed": 0},
        **{f"LoRA r=8||sweep|{lr:g}|0": {"loss": loss, "trainable_params": 2_442_240, "train_time_s": 500.0,
                                         "lr": lr, "seed": 0}
           for lr, loss in ((3e-4, 4.44), (1e-3, 4.17), (3e-3, 4.02), (1e-2, 4.05))},
        **{f"LoRA r=8||final|0.003|{seed}": {"loss": loss, "trainable_params": 2_442_240, "train_time_s": 500.0,
                                             "lr": 3e-3, "seed": seed} for seed, loss in enumerate((4.014, 4.006))},
        **{f"{MOS2}||sweep|{lr:g}|0": {"loss": loss, "trainable_params": 610_560, "train_time_s": 350.0, "lr": lr,
                                       "seed": 0}
           for lr, loss in ((3e-4, 4.510), (1e-3, 4.249), (3e-3, 4.070), (1e-2, 4.072))},
        **{f"{MOS2}||final|0.003|{seed}": {"loss": loss, "trainable_params": 610_560, "train_time_s": 350.0,
                                           "lr": 3e-3, "seed": seed} for seed, loss in enumerate((4.0694, 4.0684))},
        f"{MOS2}|no subset selection|final|0.003|0": {"loss": 4.1052, "trainable_params": 610_560,
                                                      "train_time_s": 350.0, "lr": 3e-3, "seed": 0}}},
    "quality-llm-synopses-300steps.json": {"protocol": {"task": "synopses", "steps": 300,
                                                        "lr_from": "quality-llm-synopses.json"}, "runs": {
        "LoRA r=2||final|0.01|0": {"loss": 3.7536, "trainable_params": 610_560, "train_time_s": 1368.0, "lr": 0.01,
                                   "seed": 0},
        "IncreLoRA, rank-2 budget||final|0.03|0": {"loss": 3.9397, "trainable_params": 1_051_812,
                                                   "train_time_s": 1790.0, "lr": 0.03, "seed": 0}}},
    "quality-llm-synopses-experiments.json": {"protocol": {"task": "synopses", "steps": 100, "experiment": True,
                                                           "lr_from": "quality-llm-synopses.json"}, "runs": {
        "AdaLoRA, fixed rank 2||final|0.03|0": {"loss": 4.17202, "trainable_params": 610_980, "train_time_s": 276.0,
                                                "lr": 0.03, "seed": 0, "train_loss_late": 4.17691},
        "AdaLoRA, fixed rank 2, LoRA's start||final|0.01|0": {"loss": 4.03966, "trainable_params": 610_980,
                                                              "train_time_s": 280.0, "lr": 0.01, "seed": 0}}},
    "optim_ab.json": {"results": {  # in the order main() writes them: fused AdamW first
        "torch AdamW fused": {"step_s": 0.0264, "vs_fused": 1.0, "within_round": [1.0, 1.0], "all_s": [0.0264] * 2,
                              "kernel": None, "commit": None},
        "AdamW8bit @ 5c2456e: before": {"step_s": 0.05, "vs_fused": 1.894, "within_round": [3.89, 1.28],
                                        "all_s": [0.05] * 2, "kernel": "avx512-vbmi", "commit": "5c2456e"}}},
    "rps.json": {"full_params": 788_750, "results": [
        {"compression": 1.0, "rps": {"params": 788_750, "accuracy": 0.802, "macro_f1": 0.789, "step_ms": 9.0},
         "dense": {"params": 788_750, "hidden": 128, "accuracy": 0.802, "macro_f1": 0.789, "step_ms": 5.0}},
        {"compression": 0.25, "rps": {"params": 199_598, "accuracy": 0.800, "macro_f1": 0.781, "step_ms": 9.0},
         "dense": {"params": 197_414, "hidden": 42, "accuracy": 0.692, "macro_f1": 0.510, "step_ms": 3.0}}]},
    "moe.json": {
        "runs": [
            {"variant": "LRU on demand", "budget_pct": 12.5, "hit_ratio": 0.456, "late": 0.0, "miss": 0.544,
             "precision": None, "recall": 0.0, "disk_bytes_per_token": 15.3e6, "decode_tok_s": 35.5},
            {"variant": "predictive + routing path (warm)", "budget_pct": 12.5, "hit_ratio": 0.867, "late": 0.0,
             "miss": 0.132, "precision": 0.90, "recall": 0.77, "disk_bytes_per_token": 3.6e6, "decode_tok_s": 51.8}],
        "baselines": {"accelerate cold": [{"budget_pct": 12.5, "disk_bytes_per_token": 202.6e6, "decode_tok_s": 3.5}],
                      "accelerate warm": [{"budget_pct": 12.5, "disk_bytes_per_token": 7.4e6, "decode_tok_s": 20.1}],
                      "in memory": {"disk_bytes_per_token": 0.0, "decode_tok_s": 86.6}},
        "accuracy": {"cross-layer": {"1": 0.471, "2": 0.876}, "routing-path": {"1": 0.982, "2": 0.972}}},
    "quality.json": {"task": "sections", "rows": [
        {"method": "LoRA r=1", "lr": 0.01, "accuracy": [0.749, 0.007], "macro_f1": [0.731, 0.003],
         "adapter_params": 9216, "head_params": 5390, "epoch_s": 86.2, "peak_mem_bytes": 958 * MiB, "seeds": 3}]},
    "quality-lm.json": {"task": "lm", "rows": [
        {"method": "base model, no training", "lr": 0.0, "loss": [6.835, 0.0], "perplexity": [929.0, 0.0],
         "adapter_params": 0, "head_params": 0, "epoch_s": 0.0, "peak_mem_bytes": 0, "seeds": 1},
        {"method": "LoRA r=1", "lr": 0.03, "loss": [6.324, 0.007], "perplexity": [558.0, 4.0],
         "adapter_params": 6144, "head_params": 0, "epoch_s": 60.0, "peak_mem_bytes": MiB, "seeds": 3}]},
    "adapters_step.json": {
        "size": {"hidden": 512, "layers": 8, "r": 16},
        "results": {"peft-lora": {"trainable": 1_261_568, "step_s": 1.612, "peak_bytes": 1505 * MiB,
                                  "saved_bytes": 521.9 * MiB},
                    "memfit-mos": {"trainable": 315_392, "step_s": 1.503, "peak_bytes": 1536 * MiB,
                                   "saved_bytes": 526.7 * MiB}},
        "ratios": {"memfit_lora_vs_peft_step_s": 0.91, "memfit_lora_vs_peft_peak_bytes": 1.02,
                   "memfit_lora_vs_peft_saved_bytes": 1.0, "mos_vs_lora_step_s": 1.02, "mos_vs_lora_peak_bytes": 1.0,
                   "mos_vs_lora_saved_bytes": 1.01}},
    "optim.json": {"bitsandbytes": "0.50.2", "results": {  # in the order main() writes them: bitsandbytes last
        "torch AdamW fused": {"step_s": 0.0467, "state_bytes_per_param": 8.0, "moved_bytes_per_param": 28,
                              "achieved_gbs": 30.0, "of_triad": 0.92, "vs_fused": 1.0},
        "memfit AdamW8bit": {"step_s": 0.1028, "state_bytes_per_param": 2.03, "moved_bytes_per_param": 16,
                             "achieved_gbs": 7.8, "of_triad": 0.24, "vs_fused": 2.2},
        "offload-disk cold": {"step_s": 0.9916, "state_bytes_per_param": 0.0, "moved_bytes_per_param": 52,
                              "achieved_gbs": 2.6, "of_triad": 0.08, "vs_fused": 21.2},
        "bitsandbytes AdamW8bit": {"step_s": 0.7732, "state_bytes_per_param": 2.03, "moved_bytes_per_param": 16,
                                   "achieved_gbs": 1.0, "of_triad": 0.03, "vs_fused": 16.56}}},
    "optim_finetune.json": {"results": {
        "adamw": {"eval_loss": 0.8316, "eval_accuracy": 0.755, "eval_macro_f1": 0.708},
        "adamw8bit": {"eval_loss": 0.8310, "eval_accuracy": 0.755, "eval_macro_f1": 0.709}}},
    "optim_full.json": {"zero_shot_loss": 7.21993, "runs": {
        "AdamW": [{"lr": 1e-5, "eval_loss": 6.0, "state_bytes": 1024 * MiB, "peak_rss": 3 * 2**30, "s_per_step": 1.25},
                  {"lr": 1e-4, "eval_loss": 5.5, "state_bytes": 1024 * MiB, "peak_rss": 3 * 2**30, "s_per_step": 1.2}],
        "APOLLO-Mini": [{"lr": 3e-5, "error": "TrainingError: nan"},
                        {"lr": 1e-4, "eval_loss": 5.555, "state_bytes": 2 * MiB, "peak_rss": 2 * 2**30,
                         "s_per_step": 1.1}],
        "GaLore r=128": [{"lr": 1e-3, "error": "TrainingError: nan"}]}},
    "quantize.json": {"runs": [
        {"kind": "fp32", "linear_bytes": 400 * MiB, "frozen_bytes": 512 * MiB, "peak_rss_process": 2048 * MiB,
         "s_per_step": 2.0, "base_loss": 4.0, "eval_loss": 3.0},
        {"kind": "nf4", "linear_bytes": 52 * MiB, "frozen_bytes": 164 * MiB, "peak_rss_process": 1700 * MiB,
         "s_per_step": 2.5, "base_loss": 4.1, "eval_loss": 3.03}],
        "stream": [{"kind": "fp32", "budget": 136 * MiB, "disk_per_step": 800 * MiB, "s_per_step": 4.0,
                    "peak_rss_process": 1000 * MiB},
                   {"kind": "nf4", "budget": 112 * MiB, "disk_per_step": 104 * MiB, "s_per_step": 4.4,
                    "peak_rss_process": 800 * MiB}],
        "quality": [{"kind": "fp32", "eval_loss": 0.8, "eval_accuracy": 0.75, "eval_macro_f1": 0.7, "s_per_step": 0.3},
                    {"kind": "nf4", "eval_loss": 0.81, "eval_accuracy": 0.745, "eval_macro_f1": 0.69,
                     "s_per_step": 0.33}],
        "moe": [{"variant": "fp32 experts", "budget_bytes": 40 * MiB, "slots": 32, "expert_bytes": 1.25 * MiB,
                 "experts_total_bytes": 160 * MiB, "hit_ratio": 0.9, "bytes_per_token": 2 * MiB, "decode_tok_s": 20.0},
                {"variant": "NF4 experts, same bytes", "budget_bytes": 40 * MiB, "slots": 128,
                 "expert_bytes": 0.3125 * MiB, "experts_total_bytes": 40 * MiB, "hit_ratio": 1.0,
                 "bytes_per_token": 0.0, "decode_tok_s": 30.0}]},
    "moe_train.json": {"disk_floor_gbps": 1.25, "results": {
        "memory": {"step_s": 0.40, "peak_anon_bytes": 400e6, "disk_bytes_per_step": 0.0},
        "offload 25%": {"step_s": 0.60, "peak_anon_bytes": 200e6, "disk_bytes_per_step": 140e6,
                        "read_bytes_per_step": 125e6, "forward_hit_ratio": 0.985, "backward_hit_ratio": 1.0},
        "accelerate": {"variant": "accelerate", "error": "RuntimeError: invalid gradient"}}},
    "stream.json": {"budget_frac": 0.25, "results": {
        "memory": {"step_s": 0.605, "peak_rss_bytes": 905e6, "disk_read_per_step": 0.0},
        "stream": {"step_s": 1.650, "peak_rss_bytes": 249e6, "disk_read_per_step": 1163e6, "read_per_step": 1131e6}}},
    "serve.json": {"runs": [{"adapters": 8, "memfit": {"tokens_per_s": 80.0}, "base": {"tokens_per_s": 90.0},
                             "peft_switch": {"tokens_per_s": 20.0}, "peft_mixed": {"tokens_per_s": 64.0}}],
                   "http": {"clients": 16, "adapters": 8, "requests": 64, "ttft_p50_s": 1.234, "ttft_p95_s": 2.5,
                            "tokens_per_s": 55.55}},
    "zo.json": {"results": {
        "minilm": {"Adam LoRA": {"accuracy": 0.7469, "loss": 0.84144, "peak_rss": 0.69 * 2**30, "train_time_s": 144.0,
                                 "steps": 1154, "forward_passes": 1154},
                   "MeZO full": {"error": "TrainingError: the loss is nan"}},
        "smollm2": {"zero-shot": {"exact_match": 0.0, "loss": 13.7127, "peak_rss": 1.63 * 2**30, "train_time_s": 0.0,
                                  "steps": 0, "forward_passes": 0}},
        "memory": {"Adam LoRA": {"peak_rss": 8 * 2**30, "rss_before_training": 2**30, "train_time_s": 48.0, "steps": 3},
                   "MeZO LoRA": {"peak_rss": 3 * 2**30, "rss_before_training": 2**30, "train_time_s": 39.9,
                                 "steps": 3}}}},
    "plan.json": {"configs": {
        "SmolLM2, LoRA q,v, 4x128": {"kind": "finetune", "flags": [], "predicted": 1_703_000_000,
                                     "components": {}, "measured": 1_742_000_000, "measured_default": 2_077_000_000,
                                     "estimators": {"accelerate_inference": 538e6, "accelerate_training": 2152e6,
                                                    "deepspeed": 3497e6}},
        "SmolLM2, serve": {"kind": "serve", "flags": [], "predicted": 1_081_800_000, "components": {},
                           "measured": 1_084_700_000,
                           "estimators": {"accelerate_inference": 538e6, "accelerate_training": 2152e6}}},
        "sweep": [{"budget": 1_500_000_000, "changes": ["--batch-size 1", "--grad-accum 8"],
                   "predicted": 1_300_000_000, "measured": 1_400_000_000}]},
}

EXPECTED = {  # README rows these payloads must reproduce, character for character
    ("quality-llm.json", "methods"): [
        "| row | trainable | lr | seeds | exact match | completion loss |",
        "|---|---:|---:|---:|---:|---:|",
        "| zero-shot | 0 | | 1 | 0.000 ± 0.000 | 12.790 ± 0.000 |",
        "| LoRA r=1 | 305,280 | 0.01 (sweep unfinished) | 2 | 0.719 ± 0.001 | 0.405 ± 0.007 |",
        "| MoS, LoRA r=2 budget (active rank 16) | 610,560 | 0.003 | 2 | 0.710 ± 0.014 | 0.405 ± 0.007 |"],
    ("quality-llm.json", "ablation"): [
        "| row | trainable | lr | seeds | exact match | completion loss |",
        "|---|---:|---:|---:|---:|---:|",
        "| every strategy on | 610,560 | 0.003 | 2 | 0.710 ± 0.014 | 0.405 ± 0.007 |",
        "| no subset selection | 610,560 | 0.003 | 1 | 0.733 ± 0.000 | 0.400 ± 0.000 |"],
    ("quality-llm-300steps.json", "methods"): [
        "| row | trainable | lr | seeds | exact match | completion loss |",
        "|---|---:|---:|---:|---:|---:|",
        "| LoRA r=1 | 305,280 | 0.01 (sweep unfinished) | 2 | 0.779 ± 0.012 | 0.405 ± 0.007 |"],
    ("quality-llm-synopses.json", "methods"): [
        "| row | trainable | lr | seeds | completion loss |",
        "|---|---:|---:|---:|---:|",
        "| zero-shot | 0 | | 1 | 5.420 ± 0.000 |",
        "| LoRA r=8 | 2,442,240 | 0.003 | 2 | 4.010 ± 0.006 |",
        "| MoS, LoRA r=2 budget (active rank 16) | 610,560 | 0.003 | 2 | 4.069 ± 0.001 |"],
    ("quality-llm-synopses.json", "ablation"): [
        "| row | trainable | lr | seeds | completion loss |",
        "|---|---:|---:|---:|---:|",
        "| every strategy on | 610,560 | 0.003 | 2 | 4.069 ± 0.001 |",
        "| no subset selection | 610,560 | 0.003 | 1 | 4.105 ± 0.000 |"],
    ("quality-llm-synopses-300steps.json", "methods"): [
        "| row | trainable | lr | seeds | completion loss |",
        "|---|---:|---:|---:|---:|",
        "| LoRA r=2 | 610,560 | 0.01 | 1 | 3.754 ± 0.000 |",
        "| IncreLoRA, rank-2 budget | 1,051,812 | 0.03 | 1 | 3.940 ± 0.000 |"],
    ("quality-llm-synopses-experiments.json", "experiments"): [
        "| experiment | trainable | lr | seeds | completion loss | late training loss |",
        "|---|---:|---:|---:|---:|---:|",
        "| AdaLoRA, fixed rank 2 | 610,980 | 0.03 (AdaLoRA, rank-2 budget's) | 1 | 4.172 ± 0.000 | 4.177 |",
        "| AdaLoRA, fixed rank 2, LoRA's start | 610,980 | 0.01 (LoRA r=2's) | 1 | 4.040 ± 0.000 | |"],
    ("optim_ab.json", "ab"): [
        "| version | step ms | step ÷ fused AdamW | within-round range |",
        "|---|---:|---:|---:|",
        "| torch AdamW fused | 26.4 | 1.00 | 1.00-1.00 |",
        "| AdamW8bit @ 5c2456e: before | 50.0 | 1.89 | 1.28-3.89 |"],
    ("rps.json", "compression"): [
        "| compression | RPS parameters | RPS acc / F1 | dense model of equal size | dense acc / F1 |",
        "|---|---:|---:|---|---:|",
        "| 1× | 788,750 | 0.802 / 0.789 | hidden 128 (the same model) | 0.802 / 0.789 |",
        "| 4× | 199,598 | 0.800 / 0.781 | hidden 42, 197,414 parameters | 0.692 / 0.510 |"],
    ("moe.json", "variants"): [
        "| variant | budget | hit | late | miss | prefetch precision / recall | disk MB/token | decode tok/s "
        "| vs accelerate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| LRU on demand | 12.5% | 45.6% | 0.0% | 54.4% | - | 15.3 | 35.5 | 10.1x cold |",
        "| predictive + routing path (warm) | 12.5% | 86.7% | 0.0% | 13.2% | 90% / 77% | 3.6 | 51.8 | 2.6x warm |",
        "| accelerate disk offload (cold) | 12.5% | | | | | 202.6 | 3.5 | |",
        "| accelerate disk offload (warm) | 12.5% | | | | | 7.4 | 20.1 | |",
        "| fully in memory | 100% | | | | | 0.0 | 86.6 | |"],
    ("moe.json", "layer-accuracy"): [
        "| MoE layer | 1 | 2 |", "|---|---:|---:|",
        "| cross-layer gate | 47.1% | 87.6% |", "| routing-path predictor | 98.2% | 97.2% |"],
    ("quality.json", "methods"): [
        "| method | adapter params | head params | lr | accuracy | macro-F1 | s/epoch | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| LoRA r=1 | 9,216 | 5,390 | 0.01 | 0.749 ± 0.007 | 0.731 ± 0.003 | 86 | 958 MiB |"],
    ("quality-lm.json", "methods"): [
        "| method | adapter params | lr | val loss |", "|---|---:|---:|---:|",
        "| base model, no training | 0 | | 6.835 |", "| LoRA r=1 | 6,144 | 0.03 | 6.324 ± 0.007 |"],
    ("adapters_step.json", "step"): [
        "| variant | trainable | step ms | peak RSS MiB | saved for backward MiB |", "|---|---:|---:|---:|---:|",
        "| PEFT LoRA r=16 | 1,261,568 | 1612 | 1505 | 521.9 |",
        "| memfit MoS r=16 (r_eq=4, r_pri=1, l=4) | 315,392 | 1503 | 1536 | 526.7 |",
        "| **memfit LoRA ÷ PEFT LoRA** | | **0.91×** | **1.02×** | **1.00×** |",
        "| **MoS ÷ memfit LoRA** (same active rank) | | **1.02×** | **1.00×** | **1.01×** |"],
    ("optim.json", "step"): [
        "| optimizer | step ms | state B/param (RAM) | moved B/param | GB/s | ÷ triad | step ÷ fused AdamW |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| torch AdamW (fused) | 46.7 | 8.00 | 28 | 30.0 | 0.92 | 1.00 |",
        "| **memfit AdamW8bit** | 102.8 | **2.03** | 16 | 7.8 | 0.24 | 2.20 |",
        "| bitsandbytes AdamW8bit 0.50.2 | 773.2 | 2.03 | 16 | 1.0 | 0.03 | 16.56 |",
        "| memfit offload-disk, cold (fsync + DONTNEED) | 991.6 | 0 (disk) | 52 | 2.6 | 0.08 | 21.20 |"],
    ("optim_finetune.json", "finetune"): [
        "| optimizer | val loss | accuracy | macro-F1 | val loss vs AdamW |", "|---|---:|---:|---:|---:|",
        "| torch AdamW (fp32 states) | 0.8316 | 0.755 | 0.708 | |",
        "| memfit AdamW8bit | 0.8310 | 0.755 | 0.709 | -0.07% |"],
    ("serve.json", "throughput"): [
        "| adapters | memfit tok/s | base alone tok/s | memfit ÷ base | PEFT set_adapter tok/s | memfit ÷ PEFT "
        "set_adapter | PEFT mixed batch tok/s | memfit ÷ PEFT mixed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| 8 | 80.0 | 90.0 | 0.89 | 20.0 | 4.0x | 64.0 | 1.25x |"],
    ("serve.json", "http"): [
        "| clients | adapters | requests | TTFT p50 | TTFT p95 | tokens/s |", "|---:|---:|---:|---:|---:|---:|",
        "| 16 | 8 | 64 | 1.23 s | 2.50 s | 55.5 |"],
    ("zo.json", "zo"): [
        "| model | row | accuracy / exact match | val loss | peak RSS GiB | train min | updates | forward passes |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        "| MiniLM-L6 | MeZO full | failed | | | | | TrainingError: the loss is nan |",
        "| MiniLM-L6 | Adam LoRA | 0.747 | 0.841 | 0.69 | 2.4 | 1154 | 1,154 |",
        "| SmolLM2-135M | zero-shot | 0.000 | 13.713 | 1.63 | 0.0 | 0 | 0 |"],
    ("zo.json", "memory"): [
        "| SmolLM2, batch 16 x 256 | peak RSS GiB | ÷ Adam LoRA | above RSS at update 1, GiB | s/update |",
        "|---|---:|---:|---:|---:|",
        "| Adam LoRA | 8.00 | 1.00 | 7.00 | 16.0 |", "| MeZO LoRA | 3.00 | 0.38 | 2.00 | 13.3 |"],
    ("optim_full.json", "full"): [
        "| row | optimizer state MiB | ÷ AdamW | peak RSS GiB | ÷ AdamW | s/step | held-out loss | vs AdamW "
        "| lr swept: held-out loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        "| AdamW | 1,024.0 | 1.000 | 3.00 | 1.000 | 1.20 | 5.5000 | +0.00% | 1e-05: 6.000, 0.0001: 5.500 |",
        "| APOLLO-Mini | 2.0 | 0.002 | 2.00 | 0.667 | 1.10 | 5.5550 | +1.00% | 3e-05: failed, 0.0001: 5.555 |",
        "| GaLore r=128 | | | | | | failed | | 0.001: failed |",
        "| untrained model | | | | | | 7.2199 | | |"],
    ("quantize.json", "quantize"): [
        "| base | Linear weights MiB | ÷ fp32 | all frozen MiB | ÷ fp32 | peak RSS MiB | RSS drop ÷ bytes saved "
        "| s/step | ÷ fp32 | base held-out loss | vs fp32 | after LoRA | vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| fp32 | 400.0 | 1.000 | 512.0 | 1.000 | 2,048 | | 2.00 | 1.00 | 4.0000 | +0.00% | 3.0000 | +0.00% |",
        "| nf4 | 52.0 | 0.130 | 164.0 | 0.320 | 1,700 | 1.00 | 2.50 | 1.25 | 4.1000 | +2.50% | 3.0300 | +1.00% |"],
    ("quantize.json", "stream"): [
        "| base, every layer streamed | budget MiB | disk MiB/step | ÷ fp32 | s/step | ÷ fp32 | peak RSS MiB "
        "| ÷ fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| fp32 | 136 | 800 | 1.000 | 4.00 | 1.00 | 1,000 | 1.00 |",
        "| nf4 | 112 | 104 | 0.130 | 4.40 | 1.10 | 800 | 0.80 |"],
    ("quantize.json", "quality"): [
        "| MiniLM-L6 base, LoRA r=8 | held-out loss | vs fp32 | accuracy | macro-F1 | s/step |",
        "|---|---:|---:|---:|---:|---:|",
        "| fp32 | 0.8000 | +0.00% | 0.750 | 0.700 | 0.30 |",
        "| nf4 | 0.8100 | +1.25% | 0.745 | 0.690 | 0.33 |"],
    ("quantize.json", "moe"): [
        "| offloaded MoE decode | expert cache MiB | experts cached | of all experts | hit ratio "
        "| expert MiB read/token | tok/s | ÷ fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| fp32 experts | 40.0 | 32 | 25% | 90.0% | 2.00 | 20.0 | 1.00 |",
        "| NF4 experts, same bytes | 40.0 | 128 | 100% | 100.0% | 0.00 | 30.0 | 1.50 |"],
    ("moe_train.json", "step"): [
        "| variant | s/step | ÷ memory | floor s/step (÷ floor) | disk MB/step | hit fwd / bwd | peak RSS MB "
        "| ÷ memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| fully in memory | 0.40 | 1.00 | | 0 | | 400 | 1.00 |",
        "| experts on disk, 25% budget | 0.60 | 1.50 | 0.50 (1.20x) | 140 | 98.5% / 100.0% | 200 | 0.50 |",
        "| accelerate disk offload + PEFT LoRA, 25% memory | does not train | | | | | | |"],
    ("stream.json", "step"): [
        "| variant | s/step | ÷ memory | peak RSS MB | ÷ memory | read MB/step | disk MB/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| all weights in memory | 0.605 | 1.00 | 905 | 1.00 | 0 | 0 |",
        "| **streamed, 25% budget** | 1.650 | 2.73 | **249** | **0.28** | 1131 | 1163 |"],
    ("plan.json", "plan"): [
        "| configuration | predicted peak, MB | measured, MB | pred ÷ meas | default allocator: pred ÷ meas "
        "| accelerate ÷ meas | DeepSpeed ÷ meas |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| SmolLM2, LoRA q,v, 4x128 | 1,703 | 1,742 | 0.98 | 0.82 | 1.24 | 2.01 |",
        "| SmolLM2, serve | 1,082 | 1,085 | 1.00 | | 0.50 | |",
        "",
        "2 configurations: predicted ÷ measured 0.98-1.00, worst 0.98; 2 of 2 within 0.9-1.1."],
    ("plan.json", "sweep"): [
        "| budget, MB | chosen settings | predicted, MB | measured, MB | measured ≤ budget |",
        "|---:|---|---:|---:|---|",
        "| 1,500 | --batch-size 1 --grad-accum 8 | 1,300 | 1,400 | yes |"],
}
# another machine's run of the same script (bench/optim.py --name optim-zen4): the same renderer and format
PAYLOADS["optim-zen4.json"] = PAYLOADS["optim.json"]
EXPECTED["optim-zen4.json", "step"] = EXPECTED["optim.json", "step"]
# another A/B of bench/optim_ab.py (--name optim_ab_gathers): the same renderer and format
PAYLOADS["optim_ab_gathers.json"] = PAYLOADS["optim_ab.json"]
EXPECTED["optim_ab_gathers.json", "ab"] = EXPECTED["optim_ab.json", "ab"]


@pytest.mark.parametrize(("results_file", "table"), sorted(EXPECTED))
def test_bench_renderer_reproduces_the_readme_format(results_file, table):
    tables = readme_check.script_renderer(results_file)(json.loads(json.dumps(PAYLOADS[results_file])))
    assert tables[table].splitlines() == EXPECTED[results_file, table]


def test_every_readme_block_has_a_renderer_and_a_table():
    for block in readme_check.blocks(README.read_text().splitlines()):
        assert (block.file, block.table) in EXPECTED
        assert block.table in readme_check.script_renderer(block.file)(PAYLOADS[block.file])


def test_optim_payload_without_the_bitsandbytes_version():
    payload = json.loads(json.dumps(PAYLOADS["optim.json"]))
    del payload["bitsandbytes"]  # results written before the version was recorded
    table = readme_check.script_renderer("optim.json")(payload)["step"]
    assert "| bitsandbytes AdamW8bit | 773.2 |" in table


def test_importing_the_bench_scripts_is_cheap():
    """readme_check imports every script: none may pull in torch, transformers or memfit at import time."""
    code = ("import sys; sys.path.insert(0, 'bench'); import readme_check as rc\n"
            f"for f in {REFERENCED!r}: rc.script_renderer(f)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'memfit', 'rich', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
