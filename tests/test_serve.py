"""Serving many adapters: the batched delta, continuous batching, and the OpenAI HTTP API with the real client."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package uses
import pytest
import torch
from conftest import save_model_dir
from transformers import LlamaConfig, LlamaForCausalLM

import memfit
from memfit.adapters.multi import lora_factors, wrap_for_slots
from memfit.serve.adapters import AdapterCache
from memfit.serve.engine import Engine, Request, SamplingParams
from memfit.serve.loading import ServeConfig, build_engine
from memfit.tiers.modules import empty_weights

CONFIG = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=96, tie_word_embeddings=False)
PROMPTS = ["apache traffic server software", "puppet module for", "awesome party music player for the", "gimp",
           "color picker tool and", "daemon that handles the userspace side of"]


def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


def _trained(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad or "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A tiny Llama directory and adapters of different methods and ranks: memfit LoRA r=4, MoS (active rank 6),
    AdaLoRA, and a LoRA that PEFT itself trained and saved (r=8, other targets)."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("serve")
    model_dir = save_model_dir(base(), root / "model")
    adapters = {}
    for i, (name, config) in enumerate({
        "lora": memfit.LoraConfig(r=4),
        "mos": memfit.MoSConfig(r=6, r_eq=3, r_pri=1, shards=4, target_modules=["q_proj", "v_proj", "o_proj"]),
        "ada": memfit.AdaLoRAConfig(init_rank=6, target_rank=3, target_modules=["v_proj", "down_proj"]),
    }.items()):
        memfit.save_adapter(_trained(memfit.inject(base(), config), i), root / name)
        adapters[name] = root / name
    peft_model = _trained(get_peft_model(base(), PeftLora(r=8, lora_alpha=16, target_modules=["k_proj", "up_proj"])),
                          9)
    peft_model.save_pretrained(root / "peft")
    adapters["peft"] = root / "peft"
    return model_dir, adapters


def _memfit_model(directory: Path) -> torch.nn.Module:
    """The adapter alone, the way memfit (or PEFT) runs it without serving: the independent reference."""
    if (directory / "adapter_model.safetensors").is_file():
        return memfit.import_peft(base(), directory)
    return memfit.load_adapter(base(), directory).eval()


def _engine(adapters: dict[str, Path], slots: int = 2) -> Engine:
    model = base()
    with empty_weights():
        skeleton = LlamaForCausalLM(CONFIG)
    rows, wrapped = wrap_for_slots(model, slots, r_max=8)
    cache = AdapterCache(wrapped, skeleton, slots, host=1)
    for name, directory in adapters.items():
        cache.add(name, directory)
    return Engine(model, {CONFIG.vocab_size - 1}, cache, rows, max_seqs=8, kv_budget=4000)


def test_grouped_forward_equals_the_plain_per_row_loop(served):
    _, adapters = served
    model = base()
    with empty_weights():
        skeleton = LlamaForCausalLM(CONFIG)
    rows, wrapped = wrap_for_slots(model, 3, r_max=8)
    for slot, name in enumerate(("lora", "mos", "peft")):
        factors = lora_factors(adapters[name], skeleton)
        for module, layer in wrapped.items():
            layer.set_slot(slot, factors.get(module))
    layer = wrapped["model.layers.1.self_attn.q_proj"]
    rows.set([2, 0, -1, 1, 0, 1])
    x = torch.randn(6, 5, 64)
    assert torch.allclose(layer(x), layer.reference_forward(x), rtol=1e-5, atol=1e-6)


def test_a_mixed_adapter_batch_gives_each_adapter_its_own_logits(served):
    model_dir, adapters = served
    engine = _engine(adapters, slots=4)
    order = ["peft", None, "mos", "lora", "ada", "lora"]
    slots = [-1 if a is None else engine.adapters.acquire(a) for a in order]
    x = torch.randint(0, 500, (len(order), 9), generator=torch.Generator().manual_seed(0))
    engine.rows.set(slots)
    with torch.no_grad():
        batch = engine.model(input_ids=x).logits
        for i, name in enumerate(order):
            alone = (base() if name is None else _memfit_model(adapters[name]))(input_ids=x[i:i + 1]).logits
            assert not torch.allclose(alone, base()(input_ids=x[i:i + 1]).logits, atol=1e-3) or name is None
            err = ((batch[i:i + 1] - alone).abs().max() / alone.abs().max()).item()
            assert err <= 1e-5, (name, err)


def _tokens(tokenizer, prompts=PROMPTS) -> list[list[int]]:
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


def test_continuous_batching_gives_the_text_each_request_gets_alone(served):
    """Requests for four adapters and the base, arriving over time, with fewer slots than adapters: each gets
    token for token what it gets alone."""
    from memfit.local import load_tokenizer

    model_dir, adapters = served
    prompts = _tokens(load_tokenizer(model_dir))
    plan = [(p, a, n) for i, (p, a, n) in enumerate(
        (prompts[i % len(prompts)], [None, "lora", "mos", "peft", "ada"][i % 5], 4 + i % 9) for i in range(15))]
    alone = []
    for p, a, n in plan:
        engine = _engine(adapters)
        request = engine.submit(Request(p, SamplingParams(max_new_tokens=n), a))
        engine.run_until_done()
        alone.append(request.generated)
    engine = _engine(adapters)
    together = []
    for i, (p, a, n) in enumerate(plan):
        together.append(engine.submit(Request(p, SamplingParams(max_new_tokens=n), a)))
        if i % 2:
            engine.step()  # requests join a batch that is already decoding
    sizes = []
    while engine.waiting or engine.running:
        engine.step()
        sizes.append(len(engine.running))
    assert max(sizes) >= 3  # they really shared batches
    assert [r.generated for r in together] == alone
    assert len({tuple(g) for g in alone}) > 5  # adapters change the text


def test_kv_budget_bounds_the_batch_and_later_requests_wait(served):
    model_dir, adapters = served
    engine = _engine({})
    engine.kv_budget = 3 * 30
    requests = [engine.submit(Request(list(range(5, 15)), SamplingParams(max_new_tokens=20))) for _ in range(7)]
    peak = 0
    while engine.waiting or engine.running:
        engine.step()
        peak = max(peak, len(engine.running))
        assert len(engine.running) * 30 <= engine.kv_budget
    assert peak == 3 and all(r.finish_reason == "length" for r in requests)
    with pytest.raises(memfit.MemfitError, match="--kv-budget"):
        engine.submit(Request(list(range(50)), SamplingParams(max_new_tokens=41)))


def test_sampling_is_a_function_of_the_seed(served):
    engine = _engine({})
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    a, b, c = (engine.submit(Request([5, 6, 7], p)) for p in (params, params, SamplingParams(
        max_new_tokens=12, temperature=1.0, top_p=0.9, seed=4)))
    engine.run_until_done()
    assert a.generated == b.generated != c.generated


# -- the HTTP server -----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The real app on uvicorn in a thread of this process."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path], adapter_dir: Path | None = None,
                 allow: bool = False, **config) -> None:
        import uvicorn

        from memfit.serve.app import ServerState, build_app

        engine, tokenizer, name = build_engine(model_dir, ServeConfig(
            adapters={k: str(v) for k, v in adapters.items()}, adapter_dir=str(adapter_dir) if adapter_dir else None,
            **{"max_loras": 2, "max_seqs": 8, "any_module": allow, **config}))
        self.engine, self.tokenizer, self.name = engine.start(), tokenizer, name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        state = ServerState(engine, tokenizer, name, adapter_dir, allow)
        self.server = uvicorn.Server(uvicorn.Config(build_app(state), port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    model_dir, adapters = served
    adapter_dir = tmp_path_factory.mktemp("adapter-dir")
    (adapter_dir / "ondemand").symlink_to(adapters["mos"], target_is_directory=True)
    broken = adapter_dir / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    s = Server(model_dir, {k: adapters[k] for k in ("lora", "peft", "ada")}, adapter_dir=adapter_dir)
    yield s
    s.close()


def _alone(served, adapter: str | None, ids: list[int], n: int) -> list[int]:
    _, adapters = served
    engine = _engine({adapter: adapters[adapter]} if adapter else {})
    request = engine.submit(Request(ids, SamplingParams(max_new_tokens=n), adapter))
    engine.run_until_done()
    return request.generated


def test_models_lists_the_base_and_each_adapter_with_its_parent(server):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {"model", "lora", "peft", "ada"}
    assert models["lora"].model_extra["parent"] == "model" and models["model"].model_extra["parent"] is None


@pytest.mark.parametrize("adapter", [None, "lora", "peft", "ada", "ondemand"])
def test_completions_equal_what_the_engine_gives_alone(server, served, adapter):
    client = server.client()
    prompt = PROMPTS[1]
    r = client.completions.create(model=adapter or "model", prompt=prompt, max_tokens=9, temperature=0)
    ids = list(server.tokenizer(prompt)["input_ids"])
    expected = _alone(served, "mos" if adapter == "ondemand" else adapter, ids, 9)
    assert r.choices[0].text == server.tokenizer.decode(expected, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)
    stream = client.completions.create(model=adapter or "model", prompt=prompt, max_tokens=9, temperature=0,
                                       stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_completions_use_the_chat_template(server, served):
    from memfit.serve.text import chat_ids

    server.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                      "{% if add_generation_prompt %}assistant:{% endif %}")
    messages = [{"role": "user", "content": "which section is the gimp in"}]
    r = server.client().chat.completions.create(model="lora", messages=messages, max_tokens=6, temperature=0)
    expected = _alone(served, "lora", chat_ids(server.tokenizer, messages), 6)
    assert r.choices[0].message.content == server.tokenizer.decode(expected, skip_special_tokens=True)
    assert r.choices[0].message.role == "assistant"


@pytest.mark.parametrize("body, status, text", [
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": "lora", "prompt": 3}, 400, "'prompt' must be a string"),
    ({"model": "lora", "prompt": "x", "max_tokens": -2}, 400, "'max_tokens' must be at least 1"),
    ({"model": "lora", "prompt": "x", "max_tokens": "many"}, 400, "'max_tokens' must be an integer"),
    ({"model": "lora", "prompt": "x", "max_tokens": 10**9}, 400, "above the model's context"),
    ({"model": "lora", "prompt": "gimp " * 200, "max_tokens": 4}, 400, "above the model's context"),
    ({"model": "lora", "prompt": "x", "temperature": -1}, 400, "'temperature' must be between"),
    ({"model": "lora", "prompt": "x", "logprobs": 2}, 400, "'logprobs' is not supported"),
    ({"model": "lora", "prompt": "x", "best_of": 2}, 400, "unsupported parameter"),
    ({"model": "lora", "prompt": "x", "n": 3}, 400, "only n=1"),
    ({"model": "lora", "prompt": "x", "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"model": "lora", "prompt": "   "}, 400, "empty"),
    ({"model": "broken", "prompt": "x"}, 400, "cannot be loaded"),
    ({"model": 7, "prompt": "x"}, 400, "'model' must be"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_requests_get_a_4xx_with_an_openai_error_body(server, body, status, text):
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert text in error["message"] and error["type"] in ("invalid_request_error", "not_found_error")


def test_malformed_json_and_bad_chat_messages_are_4xx(server):
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "lora", "prompt": ', timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "lora", "messages": [{"role": "robot"}]},
                   timeout=30)
    assert r.status_code == 400 and "messages[0]" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{server.url}/health", timeout=30).json()["status"] == "ok"  # still alive


def test_runtime_adapters_only_when_allowed(server):
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"}, timeout=30)
    assert r.status_code == 404 and "--allow-runtime-adapters" in r.json()["error"]["message"]


def test_runtime_load_and_unload(served):
    model_dir, adapters = served
    s = Server(model_dir, {}, allow=True)
    try:
        r = httpx.post(f"{s.url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(adapters["mos"])},
                       timeout=30)
        assert r.status_code == 200, r.text
        assert "late" in [m.id for m in s.client().models.list().data]
        r = httpx.post(f"{s.url}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent"},
                       timeout=30)
        assert r.status_code == 400 and "cannot be loaded" in r.json()["error"]["message"]
        assert httpx.post(f"{s.url}/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=30).status_code == 200
        assert "late" not in [m.id for m in s.client().models.list().data]
    finally:
        s.close()


def test_a_client_that_goes_away_mid_stream_frees_its_row(server):
    body = {"model": "lora", "prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one token, then hang up
    for _ in range(100):
        if httpx.get(f"{server.url}/health", timeout=30).json()["running"] == 0:
            break
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok", "running": 0, "waiting": 0}


def test_metrics_count_requests_tokens_batches_and_adapter_cache(server):
    server.client().completions.create(model="ada", prompt="gimp", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for name in ("memfit_requests_total", "memfit_generated_tokens_total", "memfit_batch_size_bucket",
                 "memfit_adapter_cache_hits_total", "memfit_adapter_loads_total"):
        assert name in text, name
    assert 'endpoint="/v1/completions",status="200"' in text


def test_bounded_load_with_mixed_adapters_and_malformed_requests(served):
    """300 requests from 16 clients at once, mixed adapters, one in ten malformed: no 5xx, every valid answer is
    the text the request gets alone, and the server's memory does not grow with the number of requests."""
    from concurrent.futures import ThreadPoolExecutor

    from memfit.tiers.memory import rss_bytes

    model_dir, adapters = served
    s = Server(model_dir, adapters, max_seqs=8)
    names = [None, "lora", "mos", "peft", "ada"]
    expected = {(a, p): s.tokenizer.decode(_alone(served, a, list(s.tokenizer(PROMPTS[p])["input_ids"]), 6),
                                           skip_special_tokens=True) for a in names for p in range(3)}

    def one(i: int) -> tuple[int, str | None, tuple]:
        a, p = names[i % 5], i % 3
        body = {"model": a or "model", "prompt": PROMPTS[p], "max_tokens": 6, "temperature": 0}
        if i % 10 == 7:
            body["max_tokens"] = "six"  # malformed
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=120)
        text = r.json()["choices"][0]["text"] if r.status_code == 200 else None
        return r.status_code, text, (a, p)

    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(40)))  # warm up: allocator pools, adapter slots
            before = rss_bytes()
            results = list(pool.map(one, range(300)))
        after = rss_bytes()
    finally:
        s.close()
    statuses = [code for code, _, _ in results]
    assert statuses.count(400) == 30 and statuses.count(200) == 270 and max(statuses) < 500
    assert all(text == expected[key] for code, text, key in results if code == 200)
    assert after - before < 100 * 2**20, (before, after)


def test_sigterm_finishes_the_requests_in_flight_then_exits(served, tmp_path):
    import subprocess
    import sys

    model_dir, adapters = served
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "memfit.cli", "serve", "--model", str(model_dir), "--adapter",
                             f"lora={adapters['lora']}", "--port", str(port), "--metrics",
                             str(tmp_path / "serve.jsonl")], stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "stderr").open("w"))
    try:
        for _ in range(600):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"model": "lora", "prompt": PROMPTS[2], "max_tokens": 80, "temperature": 0, "stream": True}
        lines = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and not lines:
                    proc.send_signal(15)  # SIGTERM while the request is running
                if line.strip():
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[5:]) for x in lines if x.startswith("data: {")]
        assert len(chunks) > 10  # it kept generating after the signal
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(timeout=60) == 0
        log = (tmp_path / "stderr").read_text()  # planned at its limits when it started, measured as it stops
        assert "memory plan at --kv-budget" in log and "planned (at the limits) and measured" in log
        end = json.loads((tmp_path / "serve.jsonl").read_text().splitlines()[-1])  # --metrics: its end event
        assert end["event"] == "end" and end["memory_planned"]["peak"] > 0
        assert end["memory_measured"]["peak"] > end["memory_measured"]["weights resident"] > 0
    finally:
        proc.kill()
