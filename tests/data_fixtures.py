"""Test helpers: a tiny deterministic corpus, a real SentencePiece tokenizer trained on it, and shards.

`make_tiny_corpus_shards` is shared with the training engine's tests: it builds everything in a
couple of seconds with the real `data_prep` code paths (no mocks).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data_prep.shard import ShardOptions, build_shards
from data_prep.tokenizer import TokenizerTrainOptions, train_tokenizer

_WORDS = ("the model learns to predict the next token from the previous ones while the teacher stays frozen "
          "and the student copies its distribution over the vocabulary with a temperature and attention maps "
          "def return class import lambda yield async await print range len dict list tuple set none true false "
          "héllo wörld naïve café über straße 日本語 中文 한국어 😀 🚀 ∑ ∫ π → ← ≤ ≥"
          ).split()


def tiny_documents(num_docs: int = 120, seed: int = 0) -> list[str]:
    """Deterministic documents with unicode, digits, indentation, tabs, blank lines and CRLF."""
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        lines = []
        for _ in range(rng.randint(1, 6)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(2, 14))]
            if rng.random() < 0.3:
                words.append(str(rng.randint(0, 10**6)))
            indent = rng.choice(["", "", "    ", "\t"])
            lines.append(indent + " ".join(words))
            if rng.random() < 0.2:
                lines.append("")  # a blank line inside the document
        ending = rng.choice(["\n", "", "\n\n", "\r\n"])
        docs.append(f"doc {i}: " + "\n".join(lines) + ending)
    return docs


def write_jsonl(path: Path, docs: list[str], text_field: str = "text") -> Path:
    """One JSON record per line, as `data_prep.shard` reads `.jsonl`."""
    path.write_text("".join(json.dumps({text_field: doc, "id": i}) + "\n" for i, doc in enumerate(docs)))
    return path


def make_tokenizer(tmp_path: Path, docs: list[str], vocab_size: int = 400) -> Path:
    """Train a real SentencePiece tokenizer on `docs` and return its Hugging Face directory."""
    corpus = write_jsonl(tmp_path / "tokenizer_corpus.jsonl", docs)
    out = tmp_path / "tokenizer"
    train_tokenizer(TokenizerTrainOptions(inputs=(str(corpus),), out=out, vocab_size=vocab_size))
    return out


def make_tiny_corpus_shards(tmp_path: Path, vocab_size: int = 400, seq_len: int = 32, *,
                            num_docs: int = 120, val_fraction: float = 0.1,
                            shard_tokens: int = 2000) -> tuple[Path, Path]:
    """A trained tokenizer and a complete shard directory (train and val, several shards each).

    The corpus is large enough for at least 64 train and 4 val samples of `seq_len + 1` tokens.
    """
    docs = tiny_documents(num_docs)
    tokenizer_dir = make_tokenizer(tmp_path, docs, vocab_size)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    data_dir = tmp_path / "data"
    manifest = build_shards(ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=data_dir,
                                         val_fraction=val_fraction, shard_tokens=shard_tokens))
    for split, needed in (("train", 64), ("val", 4)):
        tokens = manifest.stats["tokens"].get(split, 0)
        if (tokens - 1) // seq_len < needed:
            raise ValueError(f"tiny corpus too small for seq_len {seq_len}: {split} has {tokens} tokens; "
                             f"raise num_docs")
    return tokenizer_dir, data_dir
