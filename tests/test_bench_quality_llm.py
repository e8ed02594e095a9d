"""bench/quality_llm.py's bookkeeping (no training): the run order, the chosen rates, resuming, the tables."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality_llm.py"


@pytest.fixture(scope="module")
def qllm():
    spec = importlib.util.spec_from_file_location("bench_quality_llm", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(em: float, loss: float, lr: float, seed: int = 0, phase: str = "sweep") -> dict:
    return {"exact_match": em, "loss": loss, "trainable_params": 10, "train_time_s": 60.0, "lr": lr, "seed": seed,
            "phase": phase}


def _sweep(qllm, row: str, ems: list[float], losses: list[float] | None = None) -> dict:
    lrs = qllm.ROWS[row][2]
    losses = losses or [1.0] * len(lrs)
    return {qllm._key(row, None, "sweep", lr, 0): _run(em, loss, lr) for lr, em, loss in zip(lrs, ems, losses,
                                                                                           strict=True)}


def test_the_sweep_chooses_by_exact_match_then_loss_and_waits_for_every_rate(qllm):
    row = "LoRA r=1"
    lrs = qllm.ROWS[row][2]
    runs = _sweep(qllm, row, [0.5, 0.7, 0.7, 0.1], [1.0, 0.6, 0.5, 2.0])
    assert qllm.chosen_lr(runs, row) == lrs[2]  # a tie in exact match goes to the lower loss
    del runs[qllm._key(row, None, "sweep", lrs[0], 0)]
    assert qllm.chosen_lr(runs, row) is None
    assert qllm.chosen_lr({}, "zero-shot") == 0.0


def test_a_sweep_best_at_an_edge_grows_by_a_grid_step_up_to_twice(qllm):
    row = "IncreLoRA, rank-2 budget"
    lrs = list(qllm.ROWS[row][2])  # 3e-4, 1e-3, 3e-3, 1e-2
    runs = _sweep(qllm, row, [0.1, 0.4, 0.6, 0.7])
    assert qllm.sweep_rates(runs, row) == [*lrs, 3e-2] and qllm.chosen_lr(runs, row) is None  # 3e-2 must run
    runs[qllm._key(row, None, "sweep", 3e-2, 0)] = _run(0.65, 0.5, 3e-2)
    assert qllm.sweep_rates(runs, row) == [*lrs, 3e-2] and qllm.chosen_lr(runs, row) == 1e-2  # inside now
    runs[qllm._key(row, None, "sweep", 3e-2, 0)] = _run(0.8, 0.5, 3e-2)
    assert qllm.sweep_rates(runs, row) == [*lrs, 3e-2, 0.1]
    runs[qllm._key(row, None, "sweep", 0.1, 0)] = _run(0.9, 0.5, 0.1)
    assert qllm.sweep_rates(runs, row) == [*lrs, 3e-2, 0.1] and qllm.chosen_lr(runs, row) == 0.1  # twice: done
    low = _sweep(qllm, row, [0.9, 0.4, 0.3, 0.2])
    assert qllm.sweep_rates(low, row) == [1e-4, *lrs]  # the same at the lower edge
    runs = _sweep(qllm, row, [0.1, 0.4, 0.6, 0.7])
    runs[qllm._key(row, None, "sweep", 3e-2, 0)] = {"error": "NaN loss"}  # diverged: the best stays inside
    assert qllm.sweep_rates(runs, row) == [*lrs, 3e-2] and qllm.chosen_lr(runs, row) == 1e-2


def test_plan_orders_rows_and_filters(qllm):
    todo = qllm.plan(quick=False, seeds=2)
    rows = list(dict.fromkeys(t[0] for t in todo if t[1] is None))
    assert rows[: len(qllm.PRIORITY)] == qllm.PRIORITY and set(rows) == set(qllm.ROWS)
    first = [t for t in todo if t[0] == "LoRA r=1"]
    assert [t[2] for t in first] == ["sweep", "final", "final"]  # one sweep entry: its rates depend on its results
    assert todo[-1][0] == qllm.ABLATION_OF and todo[-1][1] is not None  # the ablation last
    probe = qllm.plan(quick=False, seeds=2, only=["LoRA r=1", "LoRA r=8"], sweep=False)
    assert probe == [(r, None, "final", None, s) for r in ("LoRA r=1", "LoRA r=8") for s in (0, 1)]


def test_summary_counts_finals_at_the_chosen_rate_only_and_probes_take_rates_from_another_file(qllm, tmp_path,
                                                                                              monkeypatch):
    row = "LoRA r=8"
    lrs = qllm.ROWS[row][2]
    runs = _sweep(qllm, row, [0.2, 0.8, 0.6, 0.1])
    for seed, em in enumerate((0.70, 0.74)):
        runs[qllm._key(row, None, "final", lrs[1], seed)] = _run(em, 0.4, lrs[1], seed, "final")
    runs[qllm._key(row, None, "final", lrs[2], 0)] = _run(0.99, 0.1, lrs[2], 0, "final")  # not the chosen rate
    (s,) = qllm.summarize({"runs": runs})
    assert (s["row"], s["seeds"], s["lr"]) == (row, 2, lrs[1])
    assert s["em"] == pytest.approx(0.72) and s["em_std"] == pytest.approx(0.0282843, rel=1e-5)
    assert f"| {row} | 10 | {lrs[1]:g} | 2 | 0.720 ± 0.028 |" in qllm.readme_tables({"runs": runs})["methods"]

    monkeypatch.setattr(qllm, "RESULTS", tmp_path)
    (tmp_path / "quality-llm.json").write_text(json.dumps({"runs": _sweep(qllm, row, [0.2, 0.8, 0.6, 0.1])}))
    longer = {qllm._key(row, None, "final", lrs[1], 0): _run(0.81, 0.3, lrs[1], 0, "final")}
    (s,) = qllm.summarize({"runs": longer, "protocol": {"lr_from": "quality-llm.json"}})
    assert (s["lr"], s["em"]) == (lrs[1], 0.81)


def test_a_row_whose_sweep_is_still_growing_shows_its_best_rate_with_finals_marked_unfinished(qllm):
    row = "Compacter"
    lrs = qllm.ROWS[row][2]  # 1e-3, 3e-3, 1e-2
    runs = _sweep(qllm, row, [0.5, 0.6, 0.7])
    for seed in (0, 1):
        runs[qllm._key(row, None, "final", lrs[2], seed)] = _run(0.7, 0.4, lrs[2], seed, "final")
    (s,) = qllm.summarize({"runs": runs})  # 3e-2 has not run: the table keeps 1e-2's finals, marked
    assert (s["lr"], s["unfinished"], s["seeds"]) == (lrs[2], True, 2)
    assert f"| {row} | 10 | 0.01 (sweep unfinished) | 2 |" in qllm.readme_tables({"runs": runs})["methods"]
    runs[qllm._key(row, None, "sweep", 3e-2, 0)] = _run(0.65, 0.5, 3e-2)  # grown, and 1e-2 stays best
    (s,) = qllm.summarize({"runs": runs})
    assert (s["lr"], s["unfinished"], s["edge"]) == (lrs[2], False, False)
    runs[qllm._key(row, None, "sweep", 3e-2, 0)] = _run(0.75, 0.5, 3e-2)  # 3e-2 wins: 0.1 runs next
    runs[qllm._key(row, None, "sweep", 0.1, 0)] = _run(0.1, 3.0, 0.1)
    (s,) = qllm.summarize({"runs": runs})  # 3e-2 is chosen but has no finals yet
    assert (s["lr"], s["unfinished"]) == (lrs[2], True)
    runs[qllm._key(row, None, "final", 3e-2, 0)] = _run(0.8, 0.3, 3e-2, 0, "final")
    (s,) = qllm.summarize({"runs": runs})
    assert (s["lr"], s["unfinished"], s["seeds"], s["em"]) == (3e-2, False, 1, 0.8)


def test_results_are_written_at_once_and_another_protocol_is_refused(qllm, tmp_path, monkeypatch):
    monkeypatch.setattr(qllm, "RESULTS", tmp_path)
    path = tmp_path / "r.json"
    results = qllm.Results(path, {"protocol": {"steps": 100}})
    results.put("k", _run(0.5, 1.0, 1e-3))
    assert json.loads(path.read_text())["runs"]["k"]["exact_match"] == 0.5
    assert qllm.Results(path, {"protocol": {"steps": 100}}).get("k")["loss"] == 1.0
    with pytest.raises(SystemExit, match="another protocol"):
        qllm.Results(path, {"protocol": {"steps": 300}})


def test_paired_comparison_counts_the_prompts_only_one_run_gets_right(qllm):
    runs = {qllm._key("LoRA r=1", None, "final", 1e-2, 0): {**_run(1.0, 0.3, 1e-2, 0, "final"), "hits": "11110"},
            qllm._key("LoRA r=8", None, "final", 1e-3, 0): {**_run(0.2, 0.3, 1e-3, 0, "final"), "hits": "00010",
                                                             "train_loss_late": 0.25},
            qllm._key("LoRA r=8", None, "sweep", 1e-3, 0): {**_run(0.2, 0.3, 1e-3), "hits": "00000"}}  # not a final
    lines = qllm.paired({"runs": runs})
    assert lines == ["LoRA r=1||final|0.01|0 vs LoRA r=8||final|0.001|0: disagree on 3 of 5; only the first right "
                     "on 3, only the second on 0; McNemar chi2 1.33",
                     "LoRA r=8||final|0.001|0: training loss over the last fifth 0.250"]


def test_synopsis_lists_answer_with_up_to_five_synopses_of_one_section():
    sys.path.insert(0, str(BENCH.parent))
    from _sections import synopsis_lists

    class Template:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return " | ".join(m["content"] for m in messages)

    rows = [{"text": f"tool {i}", "label": "net" if i % 3 else "web"} for i in range(20)]
    lists = synopsis_lists(rows, Template())
    net = sorted((r for r in lists if "'s net section" in r["prompt"]), key=lambda r: int(r["completion"][5:7]))
    assert [r["completion"].count("\n") + 1 for r in net] == [5, 5, 3]  # 13 net rows: the last answer holds 3
    assert net[0]["completion"] == "tool 1\ntool 2\ntool 4\ntool 5\ntool 7"  # file order within a section
    web = [r["completion"] for r in lists if "'s web section" in r["prompt"]]
    assert sorted(line for c in web for line in c.split("\n")) == sorted(f"tool {i}" for i in range(0, 20, 3))
    assert lists == synopsis_lists(rows, Template())  # a fixed order


def test_a_task_without_labels_chooses_and_reports_by_completion_loss(qllm):
    row = "LoRA r=1"
    lrs = qllm.ROWS[row][2]
    runs = {qllm._key(row, None, "sweep", lr, 0): {k: v for k, v in _run(0.0, loss, lr).items() if k != "exact_match"}
            for lr, loss in zip(lrs, [2.0, 1.5, 1.6, 1.9], strict=True)}
    assert qllm.chosen_lr(runs, row) == lrs[1]
    for seed, loss in enumerate((1.40, 1.42)):
        final = _run(0.0, loss, lrs[1], seed, "final")
        del final["exact_match"]
        runs[qllm._key(row, None, "final", lrs[1], seed)] = final
    table = qllm.readme_tables({"runs": runs, "protocol": {"task": "synopses", "steps": 100}})["methods"]
    assert table.splitlines()[0] == "| row | trainable | lr | seeds | completion loss |"
    assert f"| {row} | 10 | {lrs[1]:g} | 2 | 1.410 ± 0.014 |" in table


def test_results_file_names_follow_task_quick_and_steps(qllm):
    # readme_check and the plot's probe search find the files by these names
    assert qllm.stem("sections") == "quality-llm"
    assert qllm.stem("sections", steps=300) == "quality-llm-300steps"
    assert qllm.stem("synopses", quick=True) == "quality-llm-synopses-quick"
    assert qllm.stem(qllm.task_name({"protocol": {}})) == "quality-llm"  # a file from before tasks


def test_lora_and_mos_rows_take_dropout_unless_their_options_name_one(qllm):
    """The table's LoRA and MoS rows train with adapter dropout 0.1; the dropout experiments set it themselves
    (LoRA without it, the rank-adaptive rows with it), and their own value must win."""
    def dropout(row: str) -> float:
        return qllm.adapter_config(*qllm.spec(row)).dropout

    assert dropout("LoRA r=2") == dropout("MoS, LoRA r=1 budget (active rank 8)") == 0.1
    assert dropout("LoRA r=2, no dropout") == 0.0
    assert dropout("AdaLoRA, rank-2 budget, LoRA's start") == 0.0  # the method's default: the difference measured
    assert dropout("AdaLoRA, rank-2 budget, LoRA's start, dropout 0.1") == 0.1
    assert dropout("IncreLoRA, rank-2 budget, LoRA's start, dropout 0.1") == 0.1


def test_experiments_are_valid_configs_outside_the_table_with_their_own_file_and_table(qllm):
    assert qllm.stem("synopses", experiment=True) == "quality-llm-synopses-experiments"
    planned = {r for r, *_ in qllm.plan(False, 2)}
    for row, (method, options, rate_of) in qllm.EXPERIMENTS.items():
        assert rate_of in qllm.ROWS, row  # the row whose chosen rate it takes
        assert qllm.spec(row) == (method, options)  # one that became a table row too keeps its options
        assert row in qllm.ROWS or row not in planned
        qllm.adapter_config(method, options)  # a config validates itself: raises on an option it does not have
    row = "AdaLoRA, fixed rank 2, LoRA's start"
    runs = {qllm._key(row, None, "final", 1e-2, seed): {**_run(0.0, loss, 1e-2, seed, "final"),
                                                         "train_loss_late": late}
            for seed, (loss, late) in enumerate(((4.0, 3.9), (4.1, 4.1)))}
    table = qllm.readme_tables({"runs": runs, "protocol": {"task": "synopses", "steps": 100, "experiment": True}})
    assert table["experiments"].splitlines()[2] == f"| {row} | 10 | 0.01 (LoRA r=2's) | 2 | 4.050 ± 0.071 | 4.000 |"


def test_the_plot_draws_a_longer_schedule_in_its_rows_style_joined_to_the_row(qllm, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    def runs(row: str, phase: str, losses: list[float], lrs: list[float] | None = None) -> dict:
        lrs = lrs or [qllm.ROWS[row][2][1]] * len(losses)  # finals: seeds at the rate the sweep below chooses
        out = {}
        for seed, (lr, loss) in enumerate(zip(lrs, losses, strict=True)):
            run = {k: v for k, v in _run(0.0, loss, lr, 0 if phase == "sweep" else seed, phase).items()
                   if k != "exact_match"}  # the synopses task has no label
            out[qllm._key(row, None, phase, lr, run["seed"])] = run
        return out

    table = {}
    for row, done in (("LoRA r=1", [1.40, 1.42]), ("LoRA r=8", [1.30, 1.32])):
        table |= runs(row, "sweep", [2.0, 1.5, 1.6, 1.9], qllm.ROWS[row][2]) | runs(row, "final", done)
    payload = {"runs": table, "protocol": {"task": "synopses", "steps": 100}}
    monkeypatch.setattr(qllm, "RESULTS", tmp_path)
    (tmp_path / "quality-llm-synopses.json").write_text(json.dumps(payload))
    probe = {"runs": runs("LoRA r=8", "final", [1.10]) | runs("LoRA r=2", "final", [1.20]),
             "protocol": {"task": "synopses", "steps": 300, "lr_from": "quality-llm-synopses.json"}}
    (tmp_path / "quality-llm-synopses-300steps.json").write_text(json.dumps(probe))
    plt.close("all")
    qllm.plot(payload, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    ax = plt.gcf().axes[0]
    joins = [line for line in ax.lines if line.get_linestyle() == ":" and len(line.get_ydata()) == 2]
    # one dotted join, from LoRA r=8's 100-update mean to its 300-update run; LoRA r=2 has no row to join
    assert [list(line.get_ydata()) for line in joins] == [pytest.approx([1.31, 1.10])]
    r8 = next(c for c in ax.containers if c.get_label() == "LoRA r=8")
    assert joins[0].get_color() == r8.lines[0].get_color()
    assert any("hollow: 300 updates" in t.get_text() for t in ax.get_legend().get_texts())
    plt.close("all")
