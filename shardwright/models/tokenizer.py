"""Tokenizers: `tokenizer.json` through the `tokenizers` package, raw bytes when there is none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

# The chat template of models this project writes (init-model, export) when they have none of
# their own, so that /v1/chat/completions works on them out of the box.
DEFAULT_CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write_default_chat_template(directory: str | Path) -> None:
    """Give `directory` a tokenizer_config.json with DEFAULT_CHAT_TEMPLATE unless it has one."""
    path = Path(directory) / "tokenizer_config.json"
    if not path.exists():
        path.write_text(json.dumps({"chat_template": DEFAULT_CHAT_TEMPLATE}, indent=2) + "\n")


class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Token id = byte value (0-255); decoding replaces invalid UTF-8 with U+FFFD."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face fast tokenizer loaded from `tokenizer.json` (no `transformers` needed)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(directory: str | Path) -> TextTokenizer:
    """`tokenizer.json` in `directory` if present, else the raw-byte tokenizer."""
    path = Path(directory) / "tokenizer.json"
    return HFTokenizer(path) if path.is_file() else ByteTokenizer()
