"""Text in and out of the engine: chat templates, and decoding tokens as they stream without splitting a character."""

from __future__ import annotations

from typing import Any

from memfit.errors import ConfigError


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The model's chat template applied to `messages`, ending where the assistant's answer starts."""
    if tokenizer.chat_template is None:
        raise ConfigError("this model's tokenizer has no chat template; send plain prompts (no --chat), or use "
                          "/v1/completions.")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class Decoder:
    """The text of generated tokens as they arrive: `push(token)` returns the new text, holding back an unfinished
    multi-byte character until its last token is in."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
