"""OffloadAdamW (cpu and disk): equals torch.optim.AdamW, resumes exactly, survives SIGKILL, fails loudly."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memfit.errors import CheckpointError, ConfigError
from memfit.optim import OPTIMIZERS, OffloadAdamW, build_optimizer
from memfit.tiers import swap

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
CHUNK_BYTES = 4096  # 1024 values: every weight streams in several chunks, the last one partial


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(48, 200), torch.nn.ReLU(), torch.nn.Linear(200, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 48, generator=g), torch.randn(16, 3, generator=g)


def train(m: torch.nn.Module, opt: torch.optim.Optimizer, start: int, stop: int, ckpt: Path | None = None,
          every: int = 0) -> None:
    for step in range(start, stop):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if every and (step + 1) % every == 0:
            opt.save_checkpoint(ckpt)


def offload(m: torch.nn.Module, mode: str, tmp: Path) -> OffloadAdamW:
    return OffloadAdamW(m.named_parameters(), offload=mode, path=tmp / "swap", chunk_bytes=CHUNK_BYTES, **HYPER)


def assert_same(a: torch.nn.Module, b: torch.nn.Module, rel: float = 0.0) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        err = ((x - y).abs().max() / y.abs().max()).item()
        assert err <= rel, (name, err)


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_twenty_steps_equal_torch_adamw(mode, tmp_path):
    ref, ours = model(), model()
    train(ref, torch.optim.AdamW(ref.parameters(), **HYPER), 0, 20)
    train(ours, offload(ours, mode, tmp_path), 0, 20)
    assert_same(ours, ref, rel=1e-6)


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_state_dict_resume_in_a_new_optimizer(mode, tmp_path):
    full, part = model(), model()
    train(full, offload(full, mode, tmp_path / "a"), 0, 10)
    opt = offload(part, mode, tmp_path / "b")
    train(part, opt, 0, 5)
    sd = opt.state_dict()
    assert sorted(sd["state"][0]) == ["exp_avg", "exp_avg_sq", "master", "step"]

    fresh = model(seed=1)  # different weights: the state dict's master weights must win
    opt2 = offload(fresh, mode, tmp_path / "c")
    opt2.load_state_dict(sd)
    train(fresh, opt2, 5, 10)
    assert_same(fresh, full)


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_checkpoint_resume_is_exact(mode, tmp_path):
    part = model()
    train(part, offload(part, mode, tmp_path / "b"), 0, 8, ckpt=tmp_path / "ckpt", every=4)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert set(manifest["records"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert manifest["meta"]["steps"]["0.weight"] == 8

    resumed = model(seed=1)
    opt = offload(resumed, mode, tmp_path / "c")
    opt.load_checkpoint(tmp_path / "ckpt")
    train(resumed, opt, 8, 12)
    ref = model()
    train(ref, offload(ref, mode, tmp_path / "e"), 0, 12)
    assert_same(resumed, ref)


def test_disk_swap_files_are_named_by_parameter_and_old_versions_removed(tmp_path):
    m = model()
    opt = offload(m, "disk", tmp_path)
    train(m, opt, 0, 3)
    files = sorted(p.name for p in (tmp_path / "swap").iterdir())
    assert files[-1] == "manifest.json" and len(files) == 5
    assert all(".v3.swap" in f for f in files[:-1]) and any(f.startswith("0.weight-") for f in files)
    bias = next(f for f in files if f.startswith("2.bias-"))
    assert (tmp_path / "swap" / bias).stat().st_size == 3 * 4 * 3  # master, m and v of 3 fp32 values


def test_corrupt_swap_file_is_a_checksum_error(tmp_path):
    m = model()
    opt = offload(m, "disk", tmp_path)
    train(m, opt, 0, 2, ckpt=tmp_path / "ckpt", every=2)
    victim = next((tmp_path / "ckpt").glob("0.weight-*.swap"))
    data = bytearray(victim.read_bytes())
    data[1234] ^= 0xFF
    victim.unlink()  # the checkpoint file is a hard link of the live swap file: replace, do not write through
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checksum mismatch.*0\.weight"):
        offload(model(), "disk", tmp_path / "other").load_checkpoint(tmp_path / "ckpt")
    victim.write_bytes(bytes(data[:-8]))
    with pytest.raises(CheckpointError, match="expected .* bytes"):
        offload(model(), "cpu", tmp_path / "other").load_checkpoint(tmp_path / "ckpt")


def test_unwritable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot use .* for swap files.*writable directory"):
        OffloadAdamW(model().parameters(), offload="disk", path=blocker / "swap")
    m = model()
    opt = offload(m, "cpu", tmp_path)
    train(m, opt, 0, 1)
    with pytest.raises(CheckpointError, match="writable directory"):
        opt.save_checkpoint(blocker / "ckpt")
    with pytest.raises(ConfigError, match="path="):
        OffloadAdamW(model().parameters(), offload="disk")


def test_full_disk_aborts_the_step_and_keeps_the_committed_state(tmp_path, monkeypatch):
    ref, m = model(), model()
    train(ref, torch.optim.AdamW(ref.parameters(), **HYPER), 0, 5)
    opt = offload(m, "disk", tmp_path)
    train(m, opt, 0, 3)
    before = [p.detach().clone() for p in m.parameters()]
    calls = {"n": 0}
    real_pwrite = os.pwrite

    def full_disk(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:  # a few chunks get through, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(swap.os, "pwrite", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*last committed state is kept.*free disk"):
        train(m, opt, 3, 4)
    monkeypatch.setattr(swap.os, "pwrite", real_pwrite)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), before, strict=True))  # rolled back
    assert len(list((tmp_path / "swap").glob("*.swap"))) == 4  # no half-written version left behind
    train(m, opt, 3, 5)  # space freed: the same step runs again and the trajectory is unchanged
    assert_same(m, ref, rel=1e-6)


def test_registry_builds_every_optimizer(tmp_path):
    assert set(OPTIMIZERS) == {"adamw", "adamw8bit", "offload-cpu", "offload-disk", "galore", "apollo", "apollo-mini",
                               "mezo"}
    for name in set(OPTIMIZERS) - {"mezo"}:  # MeZO steps with a closure (tests/test_mezo.py)
        m = model()
        kw = {"path": tmp_path / name} if name == "offload-disk" else {}
        kw = {"rank": 4} if name in ("galore", "apollo") else kw
        opt = build_optimizer(name, m.named_parameters(), lr=1e-2, weight_decay=0.1, **kw)
        train(m, opt, 0, 2)
        assert isinstance(opt, torch.optim.Optimizer)
    with pytest.raises(ConfigError, match="adamw8bit"):
        build_optimizer("sgd", model().named_parameters(), lr=1.0)


# -- SIGKILL: a worker process trains with checkpoints every 3 steps and stops (sleeps) at a precise point ------

TOTAL, EVERY = 8, 3


def worker(mode: str, root: str, kill_at: str) -> None:
    """Train TOTAL steps; `kill_at` = "step7" (inside the 7th step's writes) or "ckpt6" (inside the step-6 save)."""
    from memfit.tiers import swap as swap_mod

    root_path = Path(root)
    state = {"step": 0, "saving": False, "writes": 0}

    def hang() -> None:
        (root_path / "hanging").write_text("1")
        time.sleep(600)

    real_write, real_fsync = swap_mod.VersionWriter.write, swap_mod._fsync

    def write(self, *args, **kwargs):
        real_write(self, *args, **kwargs)
        state["writes"] += 1
        hit_step = kill_at == "step7" and state["step"] == 7 and not state["saving"]
        hit_ckpt = kill_at == "ckpt6" and state["saving"] and state["step"] == 6
        if (hit_step or hit_ckpt) and state["writes"] > 3:
            hang()

    def fsync(path):
        real_fsync(path)
        if kill_at == "ckpt6" and state["saving"] and state["step"] == 6:
            hang()

    swap_mod.VersionWriter.write, swap_mod._fsync = write, fsync
    m = model()
    opt = offload(m, mode, root_path)
    real_save = opt.save_checkpoint

    def save(directory):
        state["saving"], state["writes"] = True, 0
        real_save(directory)
        state["saving"] = False

    opt.save_checkpoint = save
    for step in range(TOTAL):
        state["step"], state["writes"] = step + 1, 0
        train(m, opt, step, step + 1)
        if (step + 1) % EVERY == 0:
            opt.save_checkpoint(root_path / "ckpt")


@pytest.mark.parametrize(("mode", "kill_at"), [("disk", "step7"), ("disk", "ckpt6"), ("cpu", "ckpt6")])
def test_sigkill_leaves_the_last_checkpoint_loadable(mode, kill_at, tmp_path):
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_optim_offload as t; " \
           f"t.worker({mode!r}, {str(tmp_path)!r}, {kill_at!r})"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "hanging").exists():
            assert proc.poll() is None, "worker exited before reaching the kill point"
            assert time.monotonic() < deadline, "worker never reached the kill point"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved_at = 6 if kill_at == "step7" else 3  # a checkpoint interrupted mid-save is not the last one
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["meta"]["steps"]["0.weight"] == saved_at

    # Killed inside a step, the live swap files are themselves a consistent checkpoint of the previous step.
    source = tmp_path / ("swap" if kill_at == "step7" else "ckpt")
    resumed = model(seed=1)
    opt = offload(resumed, mode, tmp_path)  # the killed run's swap directory, half-written files and all
    opt.load_checkpoint(source)  # verifies every checksum
    train(resumed, opt, saved_at, TOTAL)
    ref = model()
    train(ref, offload(ref, mode, tmp_path / "ref"), 0, TOTAL)
    assert_same(resumed, ref)
