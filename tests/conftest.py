"""Shared fixtures: tiny models built from configs (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread than on two (measured up to 10x on a busy
    2-core machine); tests that need more threads set them in their own subprocess."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(num_labels: int = 3, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def bert() -> BertForSequenceClassification:
    return tiny_bert()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


DATA = Path(__file__).resolve().parent.parent / "data"


def word_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A small word-level tokenizer trained on the shipped data, saved into `directory` (no download)."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    trainer = trainers.WordLevelTrainer(vocab_size=500, special_tokens=specials)
    lines = [json.loads(line)["text"] for line in (DATA / "debian-sections-train.jsonl").read_text().splitlines()]
    tok.train_from_iterator(lines, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="[EOS]")
    fast.save_pretrained(directory)
    return fast


def save_model_dir(model, directory: Path) -> Path:
    """A local HF model directory: config, safetensors weights and the word-level tokenizer."""
    model.save_pretrained(directory)
    word_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama (vocab 512, 4 layers) saved with save_pretrained, with a tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return save_model_dir(LlamaForCausalLM(config), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT encoder (no head, like the demo's MiniLM; 6 layers like it) with a tokenizer."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                        num_attention_heads=4, max_position_embeddings=128)
    return save_model_dir(BertModel(config), tmp_path_factory.mktemp("bert"))


def cli_ok(*args) -> str:
    """Run `memfit ARGS...` in-process and return its output; the run must succeed (an exception is re-raised)."""
    from typer.testing import CliRunner

    from memfit.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def sections(tmp_path_factory) -> tuple[Path, Path]:
    """Small train/val slices of the shipped classification data (every val label occurs in train)."""
    root = tmp_path_factory.mktemp("sections")
    train = [json.loads(x) for x in (DATA / "debian-sections-train.jsonl").read_text().splitlines()[:192]]
    labels = {r["label"] for r in train}
    val = [json.loads(x) for x in (DATA / "debian-sections-val.jsonl").read_text().splitlines()]
    val = [r for r in val if r["label"] in labels][:64]
    return write_jsonl(root / "train.jsonl", train), write_jsonl(root / "val.jsonl", val)
