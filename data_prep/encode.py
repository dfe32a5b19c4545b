"""Batch encoding of documents into the token layout the shards store: ids, then the separator.

Text is encoded as raw text: a literal "</s>" in a document is tokenized as characters, never
turned into a special id (`split_special_tokens`), as SentencePiece itself does. The document
separator is appended by us, once per document: the tokenizer's end-of-text token unless
`--separator` names another (`document_separator`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shd_common.manifest import id_count, load_hf_tokenizer
from shd_common.shards import token_dtype

# End-of-turn tokens of chat templates: an instruct checkpoint's `eos_token` is often one of them,
# while its pretraining data separated documents with an end-of-text token it still has.
CHAT_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endofturn|>")
PRETRAINING_END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end▁of▁sentence|>")


@dataclass(frozen=True)
class Separator:
    """The token appended after every document: its id and its text."""

    id: int
    token: str

    def describe(self) -> dict:
        return {"id": self.id, "token": self.token}


def document_separator(tokenizer, requested: str | None = None) -> Separator:
    """The document separator of `tokenizer`: `requested` (a token's text or id) when given, else the
    end-of-text token, preferring a pretraining end-of-text token over a chat-turn end (an instruct
    tokenizer's `eos_token`), as the pretraining corpus of such a checkpoint was separated."""
    from shd_common.manifest import DataError

    vocab = tokenizer.get_vocab()
    if requested is not None:
        token = tokenizer.convert_ids_to_tokens(int(requested)) if requested.isdigit() else requested
        if token is None or token not in vocab:
            raise DataError(f"--separator {requested!r}: not a token of this tokenizer; give a token's text "
                            f"(for example {tokenizer.eos_token!r}) or its id")
        return Separator(vocab[token], token)
    eos = tokenizer.eos_token
    if eos is None:
        raise DataError("the tokenizer has no EOS token: choose the document separator with --separator TOKEN")
    if eos in CHAT_TURN_ENDS:
        for token in PRETRAINING_END_OF_TEXT:
            if token in vocab:
                return Separator(vocab[token], token)
    return Separator(tokenizer.eos_token_id, eos)


@dataclass(frozen=True)
class EncodedBatch:
    """Documents' tokens back to back (each ending in the separator) and each document's length."""

    tokens: np.ndarray
    lengths: np.ndarray


class DocumentEncoder:
    """Encodes lists of documents with any Hugging Face tokenizer directory."""

    def __init__(self, tokenizer_dir: Path, separator: str | None = None) -> None:
        self._tokenizer = load_hf_tokenizer(tokenizer_dir)
        self.separator = document_separator(self._tokenizer, separator)
        self.dtype = token_dtype(id_count(self._tokenizer))
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
            tokens[end - 1] = self.separator.id
        return EncodedBatch(tokens=tokens, lengths=lengths)
