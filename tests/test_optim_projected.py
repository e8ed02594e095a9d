"""GaLore, APOLLO and APOLLO-Mini: the authors' packages as references (bitwise), 8-bit subspace moments, exact
checkpoint round trips, the trainer and CLI (full-parameter fine-tune, accumulation, resume) and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import cli_ok, tiny_llama, write_jsonl  # noqa: E402
from test_cli_rough_edges import memfit_cli, one_error_line  # noqa: E402
from test_train import TEXT, _events, crash_and_resume  # noqa: E402

import memfit  # noqa: E402
from memfit.errors import ConfigError, TrainingError  # noqa: E402
from memfit.optim import Apollo, ApolloMini, GaLore, build_optimizer  # noqa: E402
from memfit.optim.checkpoint import load_optimizer, save_optimizer  # noqa: E402
from memfit.tiers.files import load_tensors  # noqa: E402
from memfit.train.config import TrainConfig  # noqa: E402
from memfit.train.finetune import finetune  # noqa: E402
from memfit.train.memory import optimizer_state_bytes  # noqa: E402

FULL = memfit.FullConfig()


def _params() -> list[torch.nn.Parameter]:
    """A tall and a wide weight (right and left projections) and a bias (plain Adam)."""
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 32, generator=g)), torch.nn.Parameter(torch.randn(24, 80, generator=g)),
            torch.nn.Parameter(torch.randn(32, generator=g))]


def _run(make_ref, ours, steps: int = 7, params=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`steps` steps of both optimizers on the same gradients; at step 3 the tall weight has none (it is skipped,
    its projector's refresh schedule keeps counting its own steps)."""
    a, b = (params or _params)(), (params or _params)()
    ref = make_ref(a)
    mine = ours(b)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, (p, q) in enumerate(zip(a, b, strict=True)):
            p.grad = None if (step == 3 and i == 0) else torch.randn(p.shape, generator=g)
            q.grad = None if p.grad is None else p.grad.clone()
        ref.step()
        mine.step()
    return a, b


def _groups(params: list[torch.nn.Parameter], **projected) -> list[dict]:
    return [{"params": params[:2], **projected}, {"params": params[2:], "rank": None}]


def test_galore_is_bitwise_galore_torch():
    """Seven steps with the SVD projector rebuilt every 3: the same weights, bit for bit, as the authors' code."""
    galore_torch = pytest.importorskip("galore_torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = _run(lambda ps: galore_torch.GaLoreAdamW(
            [{"params": ps[:2], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"},
             {"params": ps[2:]}], lr=1e-2, weight_decay=0.1),
            lambda ps: GaLore(_groups(ps), lr=1e-2, weight_decay=0.1, rank=4, update_proj_gap=3))
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(a[0], _params()[0])


def _square_params() -> list[torch.nn.Parameter]:
    """A square weight and a wide one at a rank equal to its smaller dimension (16), and a bias."""
    g = torch.Generator().manual_seed(7)
    return [torch.nn.Parameter(torch.randn(16, 16, generator=g)), torch.nn.Parameter(torch.randn(16, 40, generator=g)),
            torch.nn.Parameter(torch.randn(16, generator=g))]


def test_square_weights_and_a_full_rank_are_bitwise_the_references_too():
    galore_torch, apollo_torch = pytest.importorskip("galore_torch"), pytest.importorskip("apollo_torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = _run(lambda ps: galore_torch.GaLoreAdamW(
            [{"params": ps[:2], "rank": 16, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"},
             {"params": ps[2:]}], lr=1e-2), lambda ps: GaLore(_groups(ps), lr=1e-2, rank=16, update_proj_gap=2),
            params=_square_params)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    a, b = _run(lambda ps: apollo_torch.APOLLOAdamW(
        [{"params": ps[:2], "rank": 16, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std", "proj": "random",
          "scale_type": "channel"}, {"params": ps[2:]}], lr=1e-2),
        lambda ps: Apollo(_groups(ps), lr=1e-2, rank=16, update_proj_gap=2), params=_square_params)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize(("scale_type", "rank", "scale"), [("channel", 4, 1.0), ("tensor", 1, 128.0)])
def test_apollo_and_apollo_mini_are_bitwise_apollo_torch(scale_type, rank, scale):
    """The same seeded random projections (per-parameter seeds, advanced at each refresh), channel or tensor
    scaling and norm-growth limiter as the authors' APOLLO; APOLLO-Mini is its rank-1 tensor-scaled case."""
    apollo_torch = pytest.importorskip("apollo_torch")
    ours = (lambda ps: ApolloMini(_groups(ps), lr=1e-2, weight_decay=0.1, update_proj_gap=3)) if rank == 1 else \
        (lambda ps: Apollo(_groups(ps), lr=1e-2, weight_decay=0.1, rank=rank, update_proj_gap=3))
    a, b = _run(lambda ps: apollo_torch.APOLLOAdamW(
        [{"params": ps[:2], "rank": rank, "update_proj_gap": 3, "scale": scale, "proj_type": "std", "proj": "random",
          "scale_type": scale_type}, {"params": ps[2:]}], lr=1e-2, weight_decay=0.1), ours)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [GaLore, Apollo])
def test_8bit_subspace_moments_track_fp32_and_take_a_quarter_of_the_bytes(cls):
    start = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    weights = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [cls([w], lr=1e-3, rank=64, states=s) for w, s in zip(weights, ("fp32", "8bit"), strict=True)]
    g = torch.Generator().manual_seed(2)
    for _ in range(10):
        grad = torch.randn(256, 128, generator=g)
        for w, opt in zip(weights, opts, strict=True):
            w.grad = grad.clone()
            opt.step()
    moved = (weights[0] - start).norm()
    assert (weights[1] - weights[0]).norm() < 0.05 * moved
    state = opts[1].state[weights[1]]
    assert state["exp_avg_q"].dtype == torch.uint8 and "exp_avg" not in state
    moments = [optimizer_state_bytes(o)[0] - o.state[w]["projector"].numel() * 4 for o, w in zip(opts, weights,
                                                                                               strict=True)]
    assert moments[1] < 0.26 * moments[0]
    for o in opts:  # the plan printed before the first step is the state held after it
        assert o.planned_state_bytes() == optimizer_state_bytes(o)[0]


def test_8bit_states_cover_the_plain_weights_too_and_the_plan_counts_them():
    """With states="8bit" a large weight kept in plain Adam (an embedding, say) gets 8-bit moments as well."""
    g = torch.Generator().manual_seed(3)
    weight, table = torch.nn.Parameter(torch.randn(128, 64, generator=g)), torch.nn.Parameter(torch.randn(500, 16))
    opt = GaLore([{"params": [weight]}, {"params": [table], "rank": None}], lr=1e-3, rank=32, states="8bit")
    planned = opt.planned_state_bytes()
    weight.grad, table.grad = torch.randn(128, 64, generator=g), torch.randn(500, 16, generator=g)
    opt.step()
    assert opt.state[table]["exp_avg_q"].numel() == 8000 and "projector" not in opt.state[table]
    assert planned == optimizer_state_bytes(opt)[0]


def test_8bit_states_on_a_bf16_weight_compute_in_fp32():
    """The fused kernel reads fp32: a bf16 weight's projected gradient is converted, not passed as raw bytes."""
    start = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    w16, w32 = torch.nn.Parameter(start.bfloat16()), torch.nn.Parameter(start.clone())
    opts = [GaLore([w], lr=1e-3, rank=64, states="8bit") for w in (w16, w32)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(256, 128, generator=g)
        w16.grad, w32.grad = grad.bfloat16(), grad
        for o in opts:
            o.step()
    assert w16.dtype == torch.bfloat16 and torch.isfinite(w16).all()
    moved = (w32 - start).norm()
    assert (w16.float() - w32).norm() < 0.1 * moved + 0.02 * start.norm()  # bf16 rounding of weights, not garbage


@pytest.mark.parametrize(("cls", "states"), [(GaLore, "fp32"), (Apollo, "fp32"), (ApolloMini, "fp32"),
                                             (GaLore, "8bit"), (Apollo, "8bit")])
def test_checkpoint_round_trip_continues_bitwise(tmp_path, cls, states):
    """Saved mid-run through memfit's pickle-free checkpoint (projector, seeds, limiter, moments), loaded into a
    fresh optimizer: the next steps, across a projector refresh, give the same weights as the uninterrupted run.
    The 8-bit cases add a weight whose moments are large enough to be quantised (512 x 16 values)."""
    extra = [torch.nn.Parameter(torch.randn(512, 64, generator=torch.Generator().manual_seed(5)))]
    a, b = _params() + extra, _params() + [torch.nn.Parameter(extra[0].detach().clone())]
    a, b = [a[0], a[1], a[3], a[2]], [b[0], b[1], b[3], b[2]]  # the bias last: the plain group
    rank = 1 if cls is ApolloMini else 16
    a[0].data, b[0].data = a[0].data[:, :16].clone(), b[0].data[:, :16].clone()  # [64, 16]: fits rank 16
    opt_a = cls([{"params": a[:3]}, {"params": a[3:], "rank": None}], lr=1e-2, rank=rank, update_proj_gap=3,
                states=states)
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=g) for p in a] for _ in range(8)]
    for step, gs in enumerate(grads):
        for p, gr in zip(a, gs, strict=True):
            p.grad = gr.clone()
        opt_a.step()
        if step == 3:
            save_optimizer(opt_a, tmp_path)
            for p, q in zip(a, b, strict=True):
                q.data.copy_(p.data)
    opt_b = cls([{"params": b[:3]}, {"params": b[3:], "rank": None}], lr=1e-2, rank=rank, update_proj_gap=3,
                states=states)
    load_optimizer(opt_b, tmp_path)
    assert ("exp_avg_q" in opt_b.state[b[2]]) == (states == "8bit")
    assert all(opt_b.state[b[2]][k].dtype == v.dtype for k, v in opt_a.state[a[2]].items() if torch.is_tensor(v))
    for gs in grads[4:]:
        for p, gr in zip(b, gs, strict=True):
            p.grad = gr.clone()
        opt_b.step()
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


def test_one_dimensional_parameters_get_plain_adam_and_no_projector():
    params = _params()
    opt = GaLore(params, lr=1e-2, rank=4)  # one group: the bias is in it too
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert "projector" in opt.state[params[0]] and "projector" not in opt.state[params[2]]
    assert opt.state[params[2]]["exp_avg"].shape == params[2].shape
    assert opt.state[params[0]]["exp_avg"].shape == (64, 4) and opt.state[params[1]]["exp_avg"].shape == (4, 80)


def test_bad_input_is_a_clear_error():
    params = _params()
    with pytest.raises(ConfigError, match=r"rank 30 does not fit w \[24, 80\].*smaller dimension, 24"):
        GaLore(params, rank=30, names={params[1]: "w"})
    with pytest.raises(ConfigError, match="scale_type"):
        Apollo(params, rank=4, scale_type="row")
    with pytest.raises(ConfigError, match="states"):
        GaLore(params, rank=4, states="4bit")
    opt = Apollo(params, lr=1e-2, rank=4, names={p: f"layer.{i}" for i, p in enumerate(params)})
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[2].grad[5] = float("nan")
    with pytest.raises(TrainingError, match="gradient of layer.2 holds NaN"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))  # nothing moved


def test_registry_projects_body_weights_and_keeps_embeddings_head_and_small_ones_in_adam(llama):
    named = list(memfit.inject(llama, FULL).named_parameters())
    opt = build_optimizer("galore", named, lr=1e-3, rank=32)
    projected = {opt.names[id(p)] for g in opt.param_groups if g["rank"] for p in g["params"]}
    assert projected == {n for n, p in named if p.dim() == 2 and "embed" not in n and "lm_head" not in n
                         and min(p.shape) >= 32}
    assert "model.layers.0.self_attn.k_proj.weight" not in projected  # [16, 32]: smaller than the rank
    assert "model.layers.0.mlp.up_proj.weight" in projected
    with pytest.raises(ConfigError, match="no trained weight can take a rank-64 projection.*is 32.*--method full"):
        build_optimizer("apollo", named, lr=1e-3, rank=64)
    with_embeddings = build_optimizer("galore", named, lr=1e-3, rank=32, embeddings=True)
    projected = {with_embeddings.names[id(p)] for g in with_embeddings.param_groups if g["rank"] for p in g["params"]}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= projected


def test_a_tied_weight_listed_twice_is_stepped_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    named = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    assert len(named) > len(list(model.parameters()))  # the embedding is listed twice
    opt = build_optimizer("apollo-mini", named, lr=1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_finetune_full_with_each_projected_optimizer_and_grad_accum(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    for optim in ("galore", "apollo", "apollo-mini"):
        rank = None if optim == "apollo-mini" else 8
        cfg = TrainConfig(max_steps=3, batch_size=4, grad_accum=2, lr=1e-3, optim=optim, proj_rank=rank, proj_gap=2,
                          log_every=1)
        summary = finetune(llama_dir, data, tmp_path / optim, FULL, cfg, quiet=True)
        losses = [e["loss"] for e in _events(tmp_path / optim, "train")]
        assert summary["step"] == 3 and len(losses) == 3 and all(map(math.isfinite, losses)), optim
        trained = load_tensors(tmp_path / optim / "adapter.safetensors")
        base = load_tensors(llama_dir / "model.safetensors")
        key = next(k for k in trained if k.endswith("layers.0.mlp.up_proj.weight"))
        assert not torch.equal(trained[key], base["model.layers.0.mlp.up_proj.weight"]), optim  # a projected weight
        assert 0 < summary["optimizer_state_bytes"] < 8 * summary["trainable_params"], optim  # below AdamW's


def test_finetune_resume_with_galore_is_bitwise(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-3, log_every=1, checkpoint_every=3, optim="galore", proj_rank=8,
                      proj_gap=4, proj_states="8bit", warmup_ratio=0.0)
    full, trained = crash_and_resume(llama_dir, data, tmp_path, FULL, cfg)
    assert full["step"] == 12
    base = load_tensors(llama_dir / "model.safetensors")
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_cli_projected_flags_and_errors(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "train.jsonl", TEXT)
    out = tmp_path / "run"
    text = cli_ok("finetune", "--model", llama_dir, "--data", data, "--out", out, "--method", "full", "--optim",
                  "apollo", "--proj-rank", "8", "--proj-gap", "5", "--proj-scale", "2", "--proj-states", "8bit",
                  "--no-plan", "--max-steps", "2")
    assert "optimizer states" in text
    saved = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["config"]
    assert [saved[k] for k in ("optim", "proj_rank", "proj_gap", "proj_scale", "proj_states")] == [
        "apollo", 8, 5, 2.0, "8bit"]
    bad = memfit_cli("finetune", "--model", llama_dir, "--data", data, "--out", tmp_path / "bad", "--method", "full",
                     "--no-plan", "--optim", "galore", "--proj-rank", "100")
    one_error_line(bad, "no trained weight can take a rank-100 projection")
    bad = memfit_cli("finetune", "--model", llama_dir, "--data", data, "--out", tmp_path / "bad", "--method", "lora",
                     "--no-plan", "--proj-rank", "8")
    one_error_line(bad, "--proj-rank only apply to --optim galore, apollo or apollo-mini, not --optim adamw")
    bad = memfit_cli("finetune", "--model", llama_dir, "--data", data, "--out", tmp_path / "bad", "--method", "full",
                     "--no-plan", "--optim", "galore", "--proj-states", "4bit")
    one_error_line(bad, r"proj_states \(--proj-states\) must be one of fp32, 8bit")


# -- FSDP2: two gloo ranks (torchrun, CPU) against one process ------------------------------------------------

DIST_STEPS, DIST_SAVE, DIST_OPTIMS = 5, 2, {"galore": {"rank": 4}, "apollo": {"rank": 4}, "apollo-mini": {}}


def _dist_model():
    return memfit.inject(tiny_llama(), FULL).train()


def _dist_step(model, opt, x) -> None:
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def _dist_batch() -> torch.Tensor:
    return torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))


def _dist_worker(out: Path) -> None:
    """Every optimizer on a 'full'-sharded model, each rank half of the batch: uninterrupted, and resumed from
    the sharded checkpoint written after DIST_SAVE steps."""
    from memfit.train.distributed import (
        exit_worker,
        init_distributed,
        load_checkpoint,
        save_checkpoint,
        shard_model,
        teardown_distributed,
    )

    info = init_distributed()
    x = _dist_batch()[2 * info.rank: 2 * info.rank + 2]
    for name, kw in DIST_OPTIMS.items():
        for run in ("uninterrupted", "resumed"):
            model = shard_model(_dist_model(), "full")
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            opt = build_optimizer(name, named, lr=1e-2, weight_decay=0.1, update_proj_gap=2, **kw)
            first = 0 if run == "uninterrupted" else load_checkpoint(out / name / "ckpt", model, opt)["step"]
            for step in range(first, DIST_STEPS):
                _dist_step(model, opt, x)
                if run == "uninterrupted" and step + 1 == DIST_SAVE:
                    save_checkpoint(out / name / "ckpt", model, opt, {"step": step + 1})
            final = {n: p.full_tensor().detach().clone() for n, p in named}
            if info.rank == 0:
                from memfit.tiers.files import save_tensors

                save_tensors(out / name / f"{run}.safetensors", final)
    teardown_distributed()
    exit_worker(0)  # as `memfit` does under torchrun: interpreter finalization can abort in gloo's threads


def test_two_rank_fsdp_matches_one_process_and_resumes(tmp_path):
    """Row-sharded moments (right projections), all-reduced left projections and norms, the SVD on the gathered
    gradient: two ranks reach the weights of one process on the whole batch, and resume their checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    x = _dist_batch()
    for name, kw in DIST_OPTIMS.items():
        model = _dist_model()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = build_optimizer(name, named, lr=1e-2, weight_decay=0.1, update_proj_gap=2, **kw)
        start = {n: p.detach().clone() for n, p in named}
        for _ in range(DIST_STEPS):
            _dist_step(model, opt, x)
        ref = {n: p.detach() for n, p in named}
        for run in ("uninterrupted", "resumed"):
            got = load_tensors(tmp_path / name / f"{run}.safetensors")
            for n in ref:
                assert torch.allclose(got[n], ref[n], atol=2e-5, rtol=1e-4), (name, run, n,
                                                                                (got[n] - ref[n]).abs().max())
        assert any(not torch.equal(ref[n], start[n]) for n in ref)
    assert json.loads((tmp_path / "galore" / "ckpt" / "memfit_meta.json").read_text())["step"] == DIST_SAVE


if __name__ == "__main__":  # torchrun runs this file as the two ranks' worker
    _dist_worker(Path(sys.argv[1]))
