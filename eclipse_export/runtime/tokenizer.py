"""CLIP BPE tokenizer for the edge: the `tokenizers` library reading the bundle's tokenizer.json.

Padding and truncation are applied here rather than trusted from the json, so the behaviour
(77 tokens, eos kept as the last token when truncating, pad id from the tokenizer config) does
not depend on how the file was saved. Tested id-for-id against transformers' CLIPTokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TokenizedBatch:
    input_ids: np.ndarray  # int32 (B, max_length)
    attention_mask: np.ndarray  # int32 (B, max_length): 1 for bos..eos, 0 for padding
    truncated: tuple[bool, ...]  # per prompt: was text dropped to fit


class ClipTokenizer:
    """`tokenizer(prompts, padding="max_length", max_length=77, truncation=True)` as transformers'
    CLIPTokenizer does it, from the bundle's tokenizer.json, returning int32 arrays."""

    max_length: int = 77

    def __init__(self, tokenizer, pad_id: int, max_length: int = 77):
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.pad_id = pad_id
        self.max_length = max_length
        self._check_special_tokens()

    @classmethod
    def from_dir(cls, path: str | Path) -> "ClipTokenizer":
        path = Path(path)
        config = path / "tokenizer_config.json"
        return cls.from_files(path / "tokenizer.json", config if config.is_file() else None)

    @classmethod
    def from_files(cls, tokenizer_json: str | Path, config_json: str | Path | None = None) -> "ClipTokenizer":
        """tokenizer.json plus (optionally) transformers' tokenizer_config.json, which names the
        pad token and the context length."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_json))
        config = json.loads(Path(config_json).read_text(encoding="utf-8")) if config_json else {}
        if not isinstance(config, dict):
            raise ValueError("tokenizer_config.json does not hold a JSON object")
        pad = config.get("pad_token", "<|endoftext|>")
        if isinstance(pad, dict):  # older configs store AddedToken dicts
            pad = pad.get("content")
        pad_id = tok.token_to_id(pad) if isinstance(pad, str) else None
        if pad_id is None:
            raise ValueError(f"pad token {pad!r} is not in the vocabulary")
        max_length = config.get("model_max_length", 77)
        if not isinstance(max_length, (int, float)) or max_length < 2:
            raise ValueError(f"model_max_length {max_length!r} is not a usable context length")
        if max_length > 10_000:  # transformers' "no limit" sentinel: CLIP's context is 77
            max_length = 77
        return cls(tok, pad_id, int(max_length))

    def _check_special_tokens(self) -> None:
        """The json's post-processor must wrap every prompt as [bos, ..., eos]."""
        ids = self._tok.encode("").ids
        if len(ids) != 2 or ids[0] == ids[1]:
            raise ValueError(f"tokenizer.json does not add distinct bos/eos tokens (the empty prompt gives {ids})")
        self.bos_id, self.eos_id = ids

    def encode_words(self, text: str) -> list[int]:
        """Token ids of `text` without bos/eos and without truncation (λ-ECLIPSE keywords)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def __call__(self, prompts: Sequence[str]) -> TokenizedBatch:
        if isinstance(prompts, str):  # a bare string would be tokenised character by character
            raise TypeError("ClipTokenizer takes a sequence of prompts, not a single string")
        batch = len(prompts)
        ids = np.full((batch, self.max_length), self.pad_id, dtype=np.int32)
        mask = np.zeros((batch, self.max_length), dtype=np.int32)
        truncated = []
        for row, encoding in enumerate(self._tok.encode_batch(list(prompts))):
            tokens = encoding.ids  # [bos, ..., eos] from the json's post-processor
            cut = len(tokens) > self.max_length
            if cut:  # keep bos + the first words + eos, as transformers truncates
                tokens = tokens[: self.max_length - 1] + [self.eos_id]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
            truncated.append(cut)
        return TokenizedBatch(ids, mask, tuple(truncated))
