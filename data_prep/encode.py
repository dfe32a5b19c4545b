"""Batch encoding of documents into the token layout the shards store: ids, then EOS.

Text is encoded as raw text: a literal "</s>" in a document is tokenized as characters, never
turned into the EOS id (`split_special_tokens`), as SentencePiece itself does. EOS is appended by us,
once per document.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.indexed import token_dtype
from data_prep.manifest import load_hf_tokenizer


@dataclass(frozen=True)
class EncodedBatch:
    """Documents' tokens back to back (each ending in EOS) and each document's length."""

    tokens: np.ndarray
    lengths: np.ndarray


class DocumentEncoder:
    """Encodes lists of documents with any Hugging Face tokenizer directory."""

    def __init__(self, tokenizer_dir: Path) -> None:
        self._tokenizer = load_hf_tokenizer(tokenizer_dir)
        self.eos_id: int = self._tokenizer.eos_token_id
        self.dtype = token_dtype(len(self._tokenizer))
        # The Rust backend's batch encoding skips the Python wrapper's per-call overhead.
        self._backend = getattr(self._tokenizer, "backend_tokenizer", None)
        if self._backend is not None:
            self._backend.encode_special_tokens = True

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self._tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode(self, texts: list[str]) -> EncodedBatch:
        ids = self._ids(texts)
        lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int64, count=len(ids))
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        end = 0
        for doc, length in zip(ids, lengths):
            tokens[end:end + length - 1] = doc
            end += int(length)
            tokens[end - 1] = self.eos_id
        return EncodedBatch(tokens=tokens, lengths=lengths)
