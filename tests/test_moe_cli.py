"""`memfit moe generate | trace | train-predictor` on a tiny checkpoint with a tokenizer."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_moe_models import TEXTS, one_thread, save, save_tokenizer, tiny_moe  # noqa: F401 (autouse fixture)
from typer.testing import CliRunner

import memfit.moe as moe
from memfit.cli import app
from memfit.errors import ConfigError, DataError
from memfit.moe.generate import cache_warning

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tokenizer(save(tiny_moe("mixtral"), tmp_path_factory.mktemp("mixtral")))


def test_generate_prints_text_speed_and_cache_statistics(model_dir):
    out = _run("moe", "generate", "--model", model_dir, "--prompt", "puppet module for", "-n", "4",
               "--expert-budget", "25%", "--policy", "lfu", "--predictor", "none")
    plan, text = out.splitlines()[:2]
    assert plan.startswith("6 of 24 experts cached") and text.startswith("puppet module for")
    assert "tokens/s" in out and "hit ratio" in out and "bytes read" in out and "lfu / none" in out
    assert "warning" not in out  # one sequence's 2 experts per layer, and the next layer's 2, fit in 6 slots


def test_trace_train_predictor_then_scheduled_batch(model_dir, tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 12))
    _run("moe", "trace", "--model", model_dir, "--text", text, "--out", tmp_path / "trace.safetensors",
         "--seq-len", "16", "-q")
    out = _run("moe", "train-predictor", "--trace", tmp_path / "trace.safetensors", "--out",
               tmp_path / "predictor.safetensors", "--epochs", "2", "--width", "16", "--holdout", "0.2")
    assert "accuracy per layer" in out and (tmp_path / "predictor.safetensors").is_file()

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    result = tmp_path / "out.jsonl"
    out = _run("moe", "generate", "--model", model_dir, "--prompts", prompts, "--batch-size", "3", "--schedule",
               "--predictor", tmp_path / "predictor.safetensors", "-n", "3", "--out", result)
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == TEXTS and all("completion" in r for r in rows)
    assert "distinct experts per layer per decode step (scheduled, 3 batches)" in out


def test_bad_flags_are_clear_errors(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of --prompt"):
        _run("moe", "generate", "--model", model_dir)
    with pytest.raises(ConfigError, match="--schedule and --out apply to the requests of --prompts"):
        _run("moe", "generate", "--model", model_dir, "--prompt", "x", "--schedule")
    with pytest.raises(ConfigError, match="top-2 experts need at least"):
        _run("moe", "generate", "--model", model_dir, "--prompt", "x", "--expert-budget", "1KB")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt here"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no string field 'prompt' or 'text'"):
        _run("moe", "generate", "--model", model_dir, "--prompts", bad)


# -- rough edges: one line, `error:` and exit status 2 from the real entry point (memfit.cli.main) -------------

def _broken_copy(model_dir: Path, dst: Path) -> Path:
    """config.json and the tokenizer of `model_dir`, with weights that cannot load: an error about the prompt
    from this directory shows the prompt was checked before the model loads."""
    dst.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    (dst / "model.safetensors").write_bytes(b"not a safetensors file")
    return dst


@pytest.fixture(scope="module")
def broken_dir(model_dir, tmp_path_factory):
    return _broken_copy(model_dir, tmp_path_factory.mktemp("broken") / "m")


@pytest.fixture(scope="module")
def ctrl_dir(model_dir, tmp_path_factory):
    """A tokenizer whose normalizer drops control characters (as BERT's does): "\x07" is text, but no tokens."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    path = _broken_copy(model_dir, tmp_path_factory.mktemp("ctrl") / "m")
    tok = AutoTokenizer.from_pretrained(path)
    tok.backend_tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False,
                                                                  strip_accents=False, lowercase=False)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def big_vocab_dir(model_dir, tmp_path_factory):
    """Another model's tokenizer: 300 more tokens than the model's 256-token embedding."""
    from transformers import AutoTokenizer

    path = _broken_copy(model_dir, tmp_path_factory.mktemp("vocab") / "m")
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens([f"extra{i}" for i in range(300)])
    tok.save_pretrained(path)
    return path


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memfit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_empty_prompt_is_one_line_before_the_model_loads(broken_dir):
    line = _one_line_error(_cli("moe", "generate", "--model", broken_dir, "--prompt", ""))
    assert line == ("error: --prompt: the prompt is empty, so there is nothing to continue; pass some text, e.g. "
                    "--prompt 'Once upon a time'.")


def test_blank_prompt_row_names_its_file_line(broken_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "puppet module for"}\n\n{"prompt": "  "}\n')  # a blank line 2: line 3 is the 2nd row
    line = _one_line_error(_cli("moe", "generate", "--model", broken_dir, "--prompts", rows, "--batch-size", "4"))
    assert line == (f"error: {rows}:3: the prompt is only whitespace, so there is nothing to continue; give that "
                    "line a prompt with text, or delete it.")


def test_prompt_of_no_tokens_names_its_file_line(ctrl_dir, tmp_path):
    rows = tmp_path / "ctrl.jsonl"
    rows.write_text('{"prompt": "puppet module for"}\n{"prompt": "\\u0007\\u0007"}\n')
    line = _one_line_error(_cli("moe", "generate", "--model", ctrl_dir, "--prompts", rows))
    assert line == (f"error: {rows}:2: the prompt '\\x07\\x07' tokenizes to no tokens (the tokenizer drops every "
                    "character of it); give that line a prompt with text, or delete it.")


def test_token_ids_beyond_the_models_vocabulary(big_vocab_dir, tmp_path):
    line = _one_line_error(_cli("moe", "generate", "--model", big_vocab_dir, "--prompt", "puppet extra299"))
    assert re.fullmatch(r"error: --prompt: the tokenizer gives token id \d+, but the model's vocabulary has 256 "
                        r"tokens: the tokenizer is not this model's\. Save the model's own tokenizer in its directory "
                        r"\(tokenizer\.save_pretrained\)\.", line), line
    text = tmp_path / "text.txt"
    text.write_text("puppet extra299 module\n" * 20)
    with pytest.raises(DataError, match=r"text.txt: the tokenizer gives token id \d+, but the model's vocabulary"):
        _run("moe", "trace", "--model", big_vocab_dir, "--text", text, "--out", tmp_path / "t.safetensors",
             "--seq-len", "8", "-q")


# -- a batch whose per-layer working set does not fit the cache: one warning line, and the run still works -----

def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    return path


def test_batch_larger_than_the_cache_warns_once_with_the_fix(model_dir, tmp_path):
    result = runner.invoke(app, ["moe", "generate", "--model", str(model_dir), "--prompts", str(_prompts(tmp_path)),
                                 "--batch-size", "4", "-n", "2", "-q"])
    assert result.exit_code == 0, result.output
    # 24 experts of 3 x 32 x 48 float32 = 18432 bytes: 25% holds 6 (110.6 KB); 2 x min(8, 4 x 2) = 16 need 66.7%
    assert result.stderr == (
        "warning: a batch of 4 can use up to 8 experts per layer per step, but the expert cache holds 6 "
        "(--expert-budget 25%, 110.6 KB) and running one layer while the next is prefetched takes 16; most accesses "
        "will miss. Raise --expert-budget to at least 66.7% (294.9 KB) or lower --batch-size to 1.\n")
    assert len(result.stdout.splitlines()) == len(TEXTS)  # the completions, as without the warning


def test_the_suggested_budget_silences_the_warning_and_hits(model_dir, tmp_path):
    result = runner.invoke(app, ["moe", "generate", "--model", str(model_dir), "--prompts", str(_prompts(tmp_path)),
                                 "--batch-size", "4", "-n", "8", "--expert-budget", "66.7%"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "16 of 24 experts cached" in result.stdout
    hit_ratio = float(re.search(r"hit ratio\W+([\d.]+)%", result.stdout).group(1))
    assert hit_ratio > 40, result.stdout  # measured 76-78% over 4 runs (5% at the default 25%)


def test_cache_warning_for_one_sequence_and_a_smaller_batch(model_dir):
    model = moe.load(model_dir, expert_budget="8.4%")  # 2 slots: one layer's top-2, nothing for the next layer
    try:
        assert cache_warning(model, 1, "8.4%") == (
            "a batch of 1 can use up to 2 experts per layer per step, but the expert cache holds 2 (--expert-budget "
            "8.4%, 36.9 KB) and running one layer while the next is prefetched takes 4; the next layer's prefetches "
            "find no room, so many accesses will miss. Raise --expert-budget to at least 16.7% (73.7 KB).")
    finally:
        model.memfit_moe.close()
    model = moe.load(model_dir, expert_budget="50%")  # 12 slots
    try:
        assert cache_warning(model, 2, "50%") is None  # 2 x 4
        assert "lower --batch-size to 3." in cache_warning(model, 4, "50%")  # 2 x 8 > 12 >= 2 x 6
        assert "most accesses" not in cache_warning(model, 4, "50%")  # 8 fit, the next layer's 8 do not
    finally:
        model.memfit_moe.close()
