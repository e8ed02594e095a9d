"""Frozen-weight streaming: same losses, gradients and logits as the model in memory; sizes; reader; errors."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import memfit
from memfit.errors import CheckpointError, ConfigError
from memfit.tiers.budget import format_size, parse_size
from memfit.tiers.modules import empty_weights, find_layers
from memfit.tiers.st_reader import SafetensorsReader
from memfit.tiers.stream import stream_weights

LAYERS = 6


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def _base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(_config())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A sharded checkpoint (index + several files), so keys are looked up across shards."""
    path = tmp_path_factory.mktemp("ckpt")
    _base().save_pretrained(path, max_shard_size="40KB")
    return path


def _lora(model, dropout: float = 0.1):
    torch.manual_seed(1)
    return memfit.inject(model, memfit.LoraConfig(r=4, dropout=dropout, target_modules=["q_proj", "v_proj",
                                                                                          "down_proj"]))


def _layer_bytes(model) -> int:
    return sum(p.numel() * 4 for p in model.model.layers[0].parameters() if not p.requires_grad)


def _resident_bytes(model) -> int:
    params = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." not in n or p.requires_grad)
    return params + sum(b.numel() * b.element_size() for b in model.buffers())


def _train(model, tokens, steps: int = 3):
    """Losses and final trainable parameters of a few AdamW steps (dropout on, fixed RNG)."""
    model.train()
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    torch.manual_seed(5)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("spare_layers", [0, 2])  # budget = resident + (2 + spare) layers
def test_streamed_lora_training_matches_in_memory(ckpt, tokens, spare_layers):
    ref_losses, ref_params = _train(_lora(_base()), tokens)

    model = _lora(_base())
    budget = _resident_bytes(model) + (2 + spare_layers) * _layer_bytes(model) + 100
    handle = stream_weights(model, ckpt, budget)
    assert handle.pinned == list(range(LAYERS - spare_layers, LAYERS))  # spare room keeps the last layers
    assert handle.resident_bytes + handle.window_bytes <= budget
    assert model.model.layers[0].self_attn.q_proj.weight.numel() == 0  # evicted: a 0-element placeholder
    losses, params = _train(model, tokens)

    assert losses == ref_losses  # bitwise: same kernels on the same bytes, dropout RNG replayed by checkpoint
    for name, p in ref_params.items():
        assert torch.equal(params[name], p), name
    streamed = LAYERS - spare_layers
    # Forward reads layers 1..S-1 (layer 0 stays from the last backward), backward S-2..0: 2(S-1) per step,
    # plus layer 0 once at the start.
    assert handle.stats.layer_reads == 3 * 2 * (streamed - 1) + 1
    assert handle.stats.bytes_read == handle.stats.layer_reads * handle.layer_bytes[0]


def test_streamed_gradients_match(ckpt, tokens):
    ref = _lora(_base(), dropout=0.0)
    model = _lora(_base(), dropout=0.0)
    stream_weights(model, ckpt, _resident_bytes(model) + 2 * _layer_bytes(model))
    for m in (ref, model):
        m(input_ids=tokens, labels=tokens).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert torch.equal(grads[n], p.grad), n


def test_empty_weights_model_streams_then_injects(ckpt, tokens):
    """The large-model path: no weights in memory at build time, adapters injected after streaming."""
    with empty_weights():
        model = LlamaForCausalLM(_config())
    assert all(p.is_meta for p in model.parameters())
    budget = _resident_bytes(_base()) + 2 * _layer_bytes(_base())
    handle = stream_weights(model, ckpt, budget)
    _lora(model)
    ref = _lora(_base())
    assert _train(model, tokens)[0] == _train(ref, tokens)[0]

    model.eval()
    ref.eval()
    with torch.no_grad():
        streamed_logits = model(input_ids=tokens).logits
        # Generation under no_grad keeps the KV cache: layers stream at every decoding step.
        out = model.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False)
        ref_out = ref.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False)
    assert torch.equal(streamed_logits, ref(input_ids=tokens).logits)
    assert torch.equal(out, ref_out)

    handle.close()  # materialises the weights again: a plain model
    assert not hasattr(model, "memfit_stream")
    assert model.model.layers[0].mlp.up_proj.weight.shape == (64, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, streamed_logits)


def test_mos_adapter_streams(ckpt, tokens):
    def mos(model):
        torch.manual_seed(1)
        return memfit.inject(model, memfit.MoSConfig(r=4, r_eq=2, r_pri=1, shards=2, dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"]))

    ref = mos(_base())
    model = mos(_base())
    stream_weights(model, ckpt, _resident_bytes(model) + 2 * _layer_bytes(model))
    assert _train(model, tokens)[0] == _train(ref, tokens)[0]


def test_budget_too_small_names_the_sizes(ckpt):
    model = _lora(_base())
    need = _resident_bytes(model) + 2 * _layer_bytes(model)
    with pytest.raises(ConfigError, match=r"too small.*resident part.*two layers.*at least") as err:
        stream_weights(model, ckpt, need - 1000)
    assert format_size(need) in str(err.value)
    assert not hasattr(model, "memfit_stream")


def test_a_share_of_the_weights_is_a_budget_like_for_experts(ckpt):
    """--weights-budget 25% reads like --expert-budget 25%: a share of the model's weight bytes."""
    model = _lora(_base())
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    handle = stream_weights(model, ckpt, "90%")
    assert handle.budget == int(0.9 * total) and 0 < len(handle.streamed) < LAYERS
    with pytest.raises(ConfigError, match=r"a share of the model's weight bytes must lie in \(0%, 100%\]"):
        stream_weights(_lora(_base()), ckpt, "150%")


def test_big_budget_keeps_everything_resident(ckpt, tokens):
    model = _lora(_base())
    handle = stream_weights(model, ckpt, "1GB")
    assert handle.streamed == [] and handle.pinned == list(range(LAYERS))
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert handle.stats.bytes_read == 0


def test_streaming_twice_or_training_a_streamed_weight_is_an_error(ckpt, tokens):
    model = _lora(_base())
    stream_weights(model, ckpt, "1GB")
    with pytest.raises(ConfigError, match="already streams"):
        stream_weights(model, ckpt, "1GB")

    model = _lora(_base())
    stream_weights(model, ckpt, _resident_bytes(model) + 2 * _layer_bytes(model))
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="streamed but now trainable"):
        model(input_ids=tokens)


def test_checkpoint_of_another_model_is_an_error(tmp_path):
    save_file({"unrelated.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with empty_weights():
        model = LlamaForCausalLM(_config())
    with pytest.raises(CheckpointError, match="no tensor for"):
        stream_weights(model, tmp_path, "1GB")


def test_find_layers_is_generic(llama, bert):
    assert find_layers(llama)[0] == "model.layers"
    assert find_layers(bert)[0] == "bert.encoder.layer"
    with pytest.raises(ConfigError, match="ModuleList"):
        find_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(("text", "nbytes"), [
    ("200MB", 200 * 10**6), ("1.5GiB", int(1.5 * 2**30)), ("512M", 512 * 2**20), (" 64 kb ", 64_000),
    (4096, 4096), ("10", 10),
])
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("bad", ["", "MB", "12 parsecs", "-5MB", 0, True])
def test_parse_size_rejects_bad_input(bad):
    with pytest.raises(ConfigError, match="size"):
        parse_size(bad)


def test_reader_reads_every_dtype_and_detects_truncation(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
               "d": torch.tensor(True), "e": torch.randn(0, 4)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with SafetensorsReader(tmp_path / "x.safetensors") as reader:
        for key, t in tensors.items():
            assert torch.equal(reader.read(key), t), key
        many = reader.read_many(list(tensors))
        assert all(torch.equal(m, t) for m, t in zip(many, tensors.values(), strict=True))
        assert reader.bytes_read == 2 * sum(t.numel() * t.element_size() for t in tensors.values())
        with pytest.raises(CheckpointError, match="no tensor 'zz'"):
            reader.read("zz")

    raw = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-8])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        SafetensorsReader(tmp_path / "cut.safetensors")
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 10**9) + header)
    with pytest.raises(CheckpointError, match="header"):
        SafetensorsReader(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="no safetensors checkpoint"):
        SafetensorsReader(tmp_path / "missing")


def test_reader_pool_reuses_a_buffer_only_once_every_tensor_on_it_is_gone(tmp_path):
    tensors = {"a": torch.randn(300), "b": torch.randn(50)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with SafetensorsReader(tmp_path / "x.safetensors", pool=1) as reader:
        first = reader.read_many(["a", "b"])
        ptr = first[0].data_ptr()
        view = first[1][10:].t()  # a view outliving the tensors, as autograd's saved views do
        del first
        second = reader.read_many(["a", "b"])
        assert second[0].data_ptr() != ptr  # still in use through `view`: a fresh mapping
        assert torch.equal(view, tensors["b"][10:])
        del view
        third = reader.read_many(["b"])
        assert third[0].data_ptr() == ptr  # free now: reused
        assert torch.equal(third[0], tensors["b"]) and torch.equal(second[0], tensors["a"])


def _takes_o_direct(directory) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"x")
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_direct_reads_equal_buffered_reads_at_any_offset_and_length(tmp_path, where):
    # Sizes around the 4 KiB alignment and the 4 MiB staging buffer, at the unaligned offsets safetensors gives.
    root = tmp_path
    if where == "shm":  # tmpfs refuses O_DIRECT: the reader must fall back to buffered reads
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm here")
        root = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        tensors = {f"t{n}": torch.randn(n) for n in (1, 3, 1023, 1024, 1025, (4 << 20) // 4 + 5, 2_500_000)}
        tensors["u8"] = torch.arange(7, dtype=torch.uint8)
        save_file(tensors, str(root / "x.safetensors"))
        with SafetensorsReader(root / "x.safetensors", direct=True) as reader:
            assert reader.direct == _takes_o_direct(root)
            for key, t in tensors.items():
                assert torch.equal(reader.read(key), t), key
            assert reader.bytes_read == sum(t.numel() * t.element_size() for t in tensors.values())
            infos = sorted((reader.info(k) for k in tensors), key=lambda i: i.offset)  # one span, many tensors
            outs = [torch.empty(i.nbytes, dtype=torch.uint8) for i in infos]
            reader.read_span(infos, outs)
            for info, out in zip(infos, outs, strict=True):
                assert torch.equal(out.view(info.dtype).view(info.shape), tensors[info.key]), info.key
            with pytest.raises(ValueError, match="file order"):
                reader.read_span(infos[::-1], outs[::-1])
            os.truncate(root / "x.safetensors", reader.info("t1025").offset + 100)  # cut while open
            with pytest.raises(CheckpointError, match="truncated"):
                reader.read("t1025")
    finally:
        if where == "shm":
            shutil.rmtree(root)
