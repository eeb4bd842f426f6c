"""Tokenizers behind one small protocol: a fixed character vocabulary and a Hugging Face wrapper.

`CharTokenizer` serves the built-in digit tasks: its ids are fixed here, forever, because a
random-init model's embedding rows mean whatever these ids say, and a learner and a rollout server
started apart must agree without exchanging anything. `HFTokenizer` wraps a real model's tokenizer
from a local directory. This module must never download anything: `local_files_only=True`.
"""

from __future__ import annotations

from typing import Optional, Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int
    pad_token_id: int
    bos_token_id: Optional[int]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens left out."""
        ...


PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

CHAR_VOCAB: tuple[str, ...] = (PAD, BOS, EOS, *"0123456789", "+", "=", " ")
"""id -> symbol of `CharTokenizer`: 0 pad, 1 bos, 2 eos, 3..12 the digits '0'..'9', 13 '+', 14 '=', 15 ' '."""

UNKNOWN_CHAR = "\ufffd"
"""What `CharTokenizer.decode` shows for an id outside its vocabulary (a model's vocab may be larger)."""


class CharTokenizer:
    """One id per character over `CHAR_VOCAB`; 16 ids, so it fits the default 32-token model."""

    pad_token_id = 0
    bos_token_id: Optional[int] = 1
    eos_token_id = 2
    vocab_size = len(CHAR_VOCAB)

    def __init__(self) -> None:
        self._ids = {sym: i for i, sym in enumerate(CHAR_VOCAB) if len(sym) == 1}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as exc:
            raise ValueError(
                f"character {exc.args[0]!r} in {text!r} is not in the built-in character vocabulary "
                f"{''.join(self._ids)!r}"
            ) from None

    def decode(self, ids: list[int]) -> str:
        specials = (self.pad_token_id, self.bos_token_id, self.eos_token_id)
        return "".join(
            CHAR_VOCAB[i] if 0 <= i < self.vocab_size else UNKNOWN_CHAR for i in ids if i not in specials
        )


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local model directory.

    `encode`/`decode` work on plain text without special tokens; `encode_prompt` is what a dataset
    prompt goes through: the chat template (as one user turn, with the generation prompt) when the
    tokenizer has one, else the tokenizer's own special tokens around the text. The pad id falls
    back to eos because sampling only needs pad as filler that is masked out.
    """

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"cannot load a tokenizer from {path!r} (local files only, nothing is downloaded): {exc}"
            ) from exc
        if self._tok.eos_token_id is None:
            raise ValueError(
                f"the tokenizer at {path!r} has no end-of-sequence token; set eos_token in its "
                "tokenizer_config.json so that responses can end"
            )
        self.path = path
        self.vocab_size: int = len(self._tok)
        self.eos_token_id: int = self._tok.eos_token_id
        self.pad_token_id: int = (
            self._tok.pad_token_id if self._tok.pad_token_id is not None else self._tok.eos_token_id
        )
        self.bos_token_id: Optional[int] = self._tok.bos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt ready for generation: chat-templated when the tokenizer has a template."""
        if self.has_chat_template:
            # Render to text and tokenize that: the return type of apply_chat_template(tokenize=True)
            # differs across transformers versions; the rendered text carries its own special tokens.
            rendered = self._tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return self.encode(rendered)
        return list(self._tok.encode(text, add_special_tokens=True))
