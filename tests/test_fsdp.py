"""FSDP2 scale-out: a 2-rank gloo run (torchrun, CPU) matches one process in both shard modes (and with
CPUOffloadPolicy), and resumes from its sharded checkpoint (safetensors + JSON per rank) with every optimizer.

torchrun runs this file as a script (the worker at the bottom); the test compares its output with the
same training done here in one process on the whole batch. The checkpoint's safety and error checks run
in this process on a 1-rank gloo group (FSDP2 works on one rank too), which is fast.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402

import memfit  # noqa: E402
from memfit.errors import CheckpointError, ConfigError  # noqa: E402
from memfit.optim import build_optimizer  # noqa: E402
from memfit.tiers.files import atomic_write_json, load_tensors, read_json, save_tensors  # noqa: E402

STEPS, SAVE_AFTER, LR = 3, 2, 1e-2
MODES = {"grad": ("grad", False), "full": ("full", False), "full-offload": ("full", True)}  # name: args
OPTIMS = {"adamw8bit": {"min_8bit_size": 64}, "offload-cpu": {}, "offload-disk": {}}  # memfit's, under "full"


def _model():
    model = tiny_llama()
    torch.manual_seed(1)
    memfit.inject(model, memfit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    return model.train()


def _batch() -> torch.Tensor:
    return torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _optimizer(name: str, model, swap: Path) -> torch.optim.Optimizer:
    kw = {**OPTIMS.get(name, {}), **({"path": swap} if name == "offload-disk" else {})}
    return build_optimizer(name, list(_trainable(model).items()), lr=LR, **kw)


def _step(model, opt, x) -> float:
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.item()


def _worker(out: Path) -> None:
    from memfit.train.distributed import (
        exit_worker,
        gather_trainable_state,
        init_distributed,
        load_checkpoint,
        save_checkpoint,
        shard_model,
    )

    info = init_distributed()
    x = _batch()[2 * info.rank: 2 * info.rank + 2]  # data parallel: each rank half of the batch
    for mode, args in MODES.items():
        model = shard_model(_model(), *args)
        opt = torch.optim.AdamW(_trainable(model).values(), lr=LR)
        losses, grads = [], {}
        for step in range(STEPS):
            losses.append(_step(model, opt, x))
            if step == 0:
                grads = {n: _full(p.grad) for n, p in _trainable(model).items()}
            opt.step()
            opt.zero_grad()
            if step + 1 == SAVE_AFTER:
                save_checkpoint(out / mode / "ckpt", model, opt, {"step": step + 1})
        final = gather_trainable_state(model)  # what the trainer writes as the adapter (rank 0)

        resumed = shard_model(_model(), *args)
        opt2 = torch.optim.AdamW(_trainable(resumed).values(), lr=LR)
        meta = load_checkpoint(out / mode / "ckpt", resumed, opt2)
        for _ in range(meta["step"], STEPS):
            _step(resumed, opt2, x)
            opt2.step()
            opt2.zero_grad()
        again = {n: _full(p) for n, p in _trainable(resumed).items()}
        (out / mode / f"losses{info.rank}.json").write_text(json.dumps(losses))
        if info.rank == 0:
            save_tensors(out / mode / "grads.safetensors", grads)
            save_tensors(out / mode / "final.safetensors", final)
            save_tensors(out / mode / "resumed.safetensors", again)
    for name in OPTIMS:  # memfit's optimizers keep their own state layouts (8-bit codes, host/disk swap files)
        runs = {}
        for run in ("uninterrupted", "resumed"):
            model = shard_model(_model(), "full")
            opt = _optimizer(name, model, out / name / f"swap-{run}")
            first = 0 if run == "uninterrupted" else load_checkpoint(out / name / "ckpt", model, opt)["step"]
            for step in range(first, STEPS):
                _step(model, opt, x)
                opt.step()
                opt.zero_grad()
                if run == "uninterrupted" and step + 1 == SAVE_AFTER:
                    save_checkpoint(out / name / "ckpt", model, opt, {"step": step + 1})
            runs[run] = {n: _full(p) for n, p in _trainable(model).items()}
        if info.rank == 0:
            for run, tensors in runs.items():
                save_tensors(out / name / f"{run}.safetensors", tensors)
    # One rank's file is corrupt: both ranks raise (none trains on alone into a collective that never completes).
    bad = out / "bad"
    if info.rank == 0:
        shutil.copytree(out / "full" / "ckpt", bad)
        (bad / "rank1-train.safetensors").write_bytes((bad / "rank1-train.safetensors").read_bytes()[:100])
    dist.barrier()
    model = shard_model(_model(), "full")
    try:
        load_checkpoint(bad, model, torch.optim.AdamW(_trainable(model).values(), lr=LR))
    except CheckpointError as e:
        (bad / f"error{info.rank}.txt").write_text(str(e))
    dist.destroy_process_group()
    exit_worker(0)  # what `memfit` does under torchrun: exiting through interpreter finalization can abort in gloo


def _single_process():
    model = _model()
    opt = torch.optim.AdamW(_trainable(model).values(), lr=LR)
    x, losses, grads = _batch(), [], {}
    for step in range(STEPS):
        losses.append(_step(model, opt, x))
        if step == 0:
            grads = {n: p.grad.clone() for n, p in _trainable(model).items()}
        opt.step()
        opt.zero_grad()
    return losses, grads, {n: p.detach().clone() for n, p in _trainable(model).items()}


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=tol, rtol=tol), (n, (a[n] - b[n]).abs().max())


def test_two_rank_fsdp_matches_single_process_and_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    ref_losses, ref_grads, ref_final = _single_process()
    for mode in MODES:
        d = tmp_path / mode
        rank_losses = [json.loads((d / f"losses{r}.json").read_text()) for r in range(2)]
        losses = [(a + b) / 2 for a, b in zip(*rank_losses, strict=True)]  # equal tokens per rank
        assert losses == pytest.approx(ref_losses, abs=1e-5), mode
        _close(load_tensors(d / "grads.safetensors"), ref_grads)
        final = load_tensors(d / "final.safetensors")
        _close(final, ref_final)
        _close(load_tensors(d / "resumed.safetensors"), final, tol=1e-7)  # resume continues the same run
        assert (d / "ckpt" / "memfit_meta.json").is_file() and not (d / "ckpt.partial").exists()
        assert sorted(f.name for f in (d / "ckpt").iterdir()) == [
            "memfit_meta.json", "rank0-train.json", "rank0-train.safetensors", "rank1-train.json",
            "rank1-train.safetensors"]  # no DCP `.metadata` (a pickle)
    for name in OPTIMS:
        resumed = load_tensors(tmp_path / name / "resumed.safetensors")
        _close(resumed, load_tensors(tmp_path / name / "uninterrupted.safetensors"), tol=1e-7)
        _close(resumed, ref_final, tol=1e-2)  # trained, and near AdamW (8-bit states round)
    assert (tmp_path / "offload-disk" / "ckpt" / "optimizer" / "rank1" / "manifest.json").is_file()
    errors = [(tmp_path / "bad" / f"error{r}.txt").read_text() for r in range(2)]
    assert "rank1-train.safetensors is corrupt or truncated" in errors[1]
    assert "1 other rank(s) failed reading the checkpoint" in errors[0]


def test_shard_model_errors():
    from memfit.train.distributed import init_distributed, shard_model

    with pytest.raises(ConfigError, match="'grad' \\(ZeRO-2\\) or 'full'"):
        shard_model(_model(), "zero9")
    if not dist.is_initialized():
        with pytest.raises(ConfigError, match="process group"):
            shard_model(_model(), "full")
        env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
        try:
            with pytest.raises(ConfigError, match="torchrun"):
                init_distributed()
        finally:
            os.environ.update(env)


# -- the checkpoint format, on a 1-rank process group in this process ------------------------------------------
@pytest.fixture
def one_rank(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _trained(optim: str = "adamw", r: int = 4, steps: int = 1):
    from memfit.train.distributed import shard_model

    model = _model() if r == 4 else tiny_llama()
    if r != 4:
        memfit.inject(model, memfit.LoraConfig(r=r, target_modules=["q_proj", "v_proj", "down_proj"]))
    model = shard_model(model, "full")
    opt = build_optimizer(optim, list(_trainable(model).items()), lr=LR, **OPTIMS.get(optim, {}))
    x = _batch()
    for _ in range(steps):
        _step(model, opt, x)
        opt.step()
        opt.zero_grad()
    return model, opt


def _saved(root: Path, optim: str = "adamw"):
    from memfit.train.distributed import save_checkpoint

    model, opt = _trained(optim)
    save_checkpoint(root / "ckpt", model, opt, {"step": 1})
    return root / "ckpt", model, opt


def _opt_tensors(opt) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": _full(v) for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_one_rank_round_trip_restores_parameters_and_state(tmp_path, one_rank, optim):
    from memfit.train.distributed import load_checkpoint

    ckpt, model, opt = _saved(tmp_path, optim)
    info = read_json(ckpt / "rank0-train.json")
    assert info["world_size"] == 1 and info["optimizer"] == type(opt).__name__
    keys = set(load_tensors(ckpt / "rank0-train.safetensors"))
    assert {k for k in keys if k.startswith("param.")} == {f"param.{n}" for n in _trainable(model)}
    if optim == "adamw8bit":
        assert any(k.endswith(".exp_avg_q") for k in keys) and info["dtensors"]
    fresh, opt2 = _trained(optim, steps=0)
    assert load_checkpoint(ckpt, fresh, opt2) == {"step": 1}
    _close({n: _full(p) for n, p in _trainable(fresh).items()}, {n: _full(p) for n, p in _trainable(model).items()},
           tol=0)
    _close(_opt_tensors(opt2), _opt_tensors(opt), tol=0)
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"] == (0.9, 0.999)


class _Payload:
    """Unpickling this opens (creates) `marker`: stands for any code a crafted pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _no_unpickling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the resume path unpickled something")

    for owner, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                        (torch.serialization, "load")]:
        monkeypatch.setattr(owner, name, refuse)


@pytest.mark.parametrize("case", ["dcp", "safetensors", "json", "meta", "stray"])
def test_malicious_checkpoint_is_never_unpickled(tmp_path, one_rank, monkeypatch, case):
    from memfit.train.distributed import load_checkpoint

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload is live: unpickling it does create the file
    assert probe.exists()
    marker, ckpt = tmp_path / "pwned", tmp_path / "ckpt"
    payload = pickle.dumps(_Payload(marker))
    if case == "dcp":  # a torch.distributed.checkpoint directory (older memfit, or crafted)
        ckpt.mkdir()
        atomic_write_json(ckpt / "memfit_meta.json", {"step": 1})
        for name in (".metadata", "__0_0.distcp"):
            (ckpt / name).write_bytes(payload)
    else:
        _saved(tmp_path)
        target = {"safetensors": "rank0-train.safetensors", "json": "rank0-train.json", "meta": "memfit_meta.json",
                  "stray": ".metadata"}[case]
        (ckpt / target).write_bytes(payload)
        if case == "stray":  # pickles beside a valid checkpoint are never opened
            for name in ("__0_0.distcp", "optimizer.pt", "rank0.pt"):
                (ckpt / name).write_bytes(payload)
    model, opt = _trained(steps=0)
    _no_unpickling(monkeypatch)
    if case == "stray":
        assert load_checkpoint(ckpt, model, opt) == {"step": 1}
    else:
        match = {"dcp": ".metadata is a pickle", "safetensors": "corrupt", "json": "not valid JSON",
                 "meta": "not valid JSON"}[case]
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(ckpt, model, opt)
    assert not marker.exists()


def _edit_json(ckpt: Path, change) -> None:
    info = read_json(ckpt / "rank0-train.json")
    change(info)
    atomic_write_json(ckpt / "rank0-train.json", info)


def _edit_tensors(ckpt: Path, change) -> None:
    tensors = load_tensors(ckpt / "rank0-train.safetensors")
    change(tensors)
    save_tensors(ckpt / "rank0-train.safetensors", tensors)


def _first(prefix: str):
    return lambda d: next(k for k in sorted(d) if k.startswith(prefix))


def _wide(d: dict, key: str) -> None:
    d[key] = torch.zeros(d[key].shape[0], d[key].shape[1] + 1)


def _change_both(ckpt: Path, change) -> None:
    """Change a parameter's tensor and its JSON record alike: the files agree, the model does not."""
    tensors = load_tensors(ckpt / "rank0-train.safetensors")
    key = _first("param.")(tensors)
    tensors[key] = change(tensors[key])
    save_tensors(ckpt / "rank0-train.safetensors", tensors)
    _edit_json(ckpt, lambda i: i["tensors"].update({key: {"shape": list(tensors[key].shape),
                                                          "dtype": str(tensors[key].dtype)[6:]}}))


EDITS = {  # name: (edit of the checkpoint directory, model/optimizer to load into, message)
    "world size": (lambda c: _edit_json(c, lambda i: i.update(world_size=2)), {}, "written by 2 rank"),
    "rank": (lambda c: _edit_json(c, lambda i: i.update(rank=1)), {}, "holds rank 1's shards"),
    "missing tensor": (lambda c: _edit_tensors(c, lambda t: t.pop(_first("param.")(t))), {}, "is missing"),
    "missing state": (lambda c: _edit_tensors(c, lambda t: t.pop(_first("state.")(t))), {}, "is missing"),
    "shape vs json": (lambda c: _edit_tensors(c, lambda t: _wide(t, _first("param.")(t))), {}, "says float32"),
    "shape vs model": (lambda c: _change_both(c, lambda t: torch.zeros(t.shape[0], t.shape[1] + 1)), {},
                       "the model's local shard"),
    "dtype": (lambda c: _change_both(c, torch.Tensor.double), {}, "float64"),
    "unlisted tensor": (lambda c: _edit_tensors(c, lambda t: t.update(extra=torch.zeros(1))), {}, "not listed"),
    "malformed": (lambda c: _edit_json(c, lambda i: i.pop("dtensors")), {}, "malformed"),
    "placements": (lambda c: _edit_json(c, lambda i: next(iter(i["dtensors"].values())).update(
        placements=["Replicate()"])), {}, "was sharded as"),
    "other optimizer": (lambda c: None, {"optim": "adamw8bit"}, "holds AdamW state, this optimizer is AdamW8bit"),
    "other adapters": (lambda c: None, {"r": 8}, "the model's local shard"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_mismatching_checkpoint_is_a_clear_error(tmp_path, one_rank, edit):
    from memfit.train.distributed import load_checkpoint

    change, into, match = EDITS[edit]
    ckpt, _, _ = _saved(tmp_path)
    change(ckpt)
    model, opt = _trained(steps=0, **into)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(ckpt, model, opt)
    assert "rank0-train." in str(e.value) and "\n" not in str(e.value)  # one line that names the file


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, one_rank, monkeypatch):
    from memfit.train import distributed

    ckpt, model, opt = _saved(tmp_path)
    before = (ckpt / "rank0-train.safetensors").read_bytes()
    (tmp_path / "ckpt.old").mkdir()  # left by a save cut between its two renames: must not block the next one
    (tmp_path / "ckpt.old" / "junk").write_text("x")
    distributed.save_checkpoint(ckpt, model, opt, {"step": 2})
    assert read_json(ckpt / "memfit_meta.json") == {"step": 2} and not (tmp_path / "ckpt.old").exists()

    def full_disk(*args, **kwargs):
        raise CheckpointError("writing ... failed: No space left on device.")

    before = (ckpt / "rank0-train.safetensors").read_bytes()
    monkeypatch.setattr(distributed, "save_tensors", full_disk)
    with pytest.raises(CheckpointError, match="No space left"):
        distributed.save_checkpoint(ckpt, model, opt, {"step": 3})
    assert read_json(ckpt / "memfit_meta.json") == {"step": 2}
    assert (ckpt / "rank0-train.safetensors").read_bytes() == before


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
