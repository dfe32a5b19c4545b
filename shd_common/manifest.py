"""The shard directory's `manifest.json`: what was written, with which tokenizer and options.

The manifest is the single source of truth for a shard directory: `data_prep.shard` rewrites it
atomically after every completed shard (so a resumed run knows exactly what is done), and readers
trust only shards it lists, and only once it says `complete`. `tokenizer_identity` is shared with the
training engine so that it can compare a tokenizer directory against the data it is about to read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shd_common.integrity import FileDigest, write_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
# Files that define a Hugging Face tokenizer; other files of a model directory (weights, config)
# do not change token ids and are left out of the tokenizer hash.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


class DataError(ValueError):
    """Bad input, options or shard data; the message says which file or option and what to do."""


@dataclass(frozen=True)
class TokenizerIdentity:
    """What must match between a tokenizer and the shards made with it."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int | None
    unk_id: int | None
    files_sha256: str


@dataclass(frozen=True)
class ShardRecord:
    """One completed shard; `first_doc`/`last_doc` are global indices in input document order."""

    name: str
    split: str
    documents: int
    tokens: int
    first_doc: int
    last_doc: int
    bin: FileDigest
    idx: FileDigest

    def bin_path(self, root: Path) -> Path:
        return root / f"{self.name}.bin"

    def idx_path(self, root: Path) -> Path:
        return root / f"{self.name}.idx"


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest; `path` is the manifest file, shards live beside it."""

    path: Path
    complete: bool
    tokenizer: TokenizerIdentity
    dtype: str
    options: dict[str, Any]
    shards: tuple[ShardRecord, ...]
    stats: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def root(self) -> Path:
        return self.path.parent

    def split_shards(self, split: str) -> tuple[ShardRecord, ...]:
        return tuple(s for s in self.shards if s.split == split)

    def to_json(self) -> str:
        body = {
            "format_version": self.format_version,
            "complete": self.complete,
            "tokenizer": asdict(self.tokenizer),
            "dtype": self.dtype,
            "options": self.options,
            "shards": [asdict(s) for s in self.shards],
            "stats": self.stats,
        }
        return json.dumps(body, indent=2, sort_keys=True) + "\n"


def write_manifest(manifest: Manifest) -> None:
    """Replace the manifest atomically (temp file, fsync, rename)."""
    write_atomic(manifest.path, manifest.to_json().encode())


def load_manifest(data_dir: str | Path, *, require_complete: bool) -> Manifest:
    """Parse `data_dir/manifest.json`; raises DataError naming the file when it is missing or bad."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest; is {data_dir} a directory written by `python -m data_prep.shard`?")
    try:
        body = json.loads(path.read_text())
        if body["format_version"] != FORMAT_VERSION:
            raise DataError(f"{path}: format version {body['format_version']}, this code reads {FORMAT_VERSION}")
        manifest = Manifest(
            path=path,
            complete=bool(body["complete"]),
            tokenizer=TokenizerIdentity(**body["tokenizer"]),
            dtype=body["dtype"],
            options=body["options"],
            shards=tuple(
                ShardRecord(**{**s, "bin": FileDigest(**s["bin"]), "idx": FileDigest(**s["idx"])})
                for s in body["shards"]
            ),
            stats=body["stats"],
        )
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a valid manifest ({type(exc).__name__}: {exc})") from exc
    if require_complete and not manifest.complete and "tasks" in manifest.options:
        raise DataError(f"{path}: a task of this multi-task run was run again after the merge; merge again: "
                        f"python -m data_prep.shard merge --out {data_dir}")
    if require_complete and not manifest.complete:
        raise DataError(f"{path}: the shard run has not finished; run the same `python -m data_prep.shard` "
                        "command again to resume and complete it")
    return manifest


def read_manifest(data_dir: str | Path) -> Manifest:
    """The manifest of a finished shard directory; raises DataError naming the file otherwise."""
    return load_manifest(data_dir, require_complete=True)


def tokenizer_files_sha256(tokenizer_dir: Path) -> str:
    """sha256 over the names and contents of the tokenizer-defining files present in the directory."""
    digest = hashlib.sha256()
    present = [name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not present:
        raise DataError(f"{tokenizer_dir}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    for name in present:
        digest.update(name.encode() + b"\0" + hashlib.sha256((tokenizer_dir / name).read_bytes()).digest())
    return digest.hexdigest()


def load_hf_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` for a local directory, with a DataError naming it on failure."""
    from transformers import AutoTokenizer  # deferred: importing transformers costs seconds

    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise DataError(f"{path}: tokenizer directory not found")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot load a Hugging Face tokenizer from it ({exc})") from exc


def id_count(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many ids the tokenizer's ids span (its largest id + 1): usually its length, but a vocabulary
    may leave gaps, and the shards' dtype and the model's embedding must hold the largest id."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def tokenizer_identity(tokenizer_dir: str | Path) -> TokenizerIdentity:
    """The identity of any Hugging Face tokenizer directory (a trained one or a teacher checkpoint)."""
    tokenizer = load_hf_tokenizer(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise DataError(f"{tokenizer_dir}: the tokenizer has no EOS token, which shards need between documents")
    return TokenizerIdentity(
        vocab_size=id_count(tokenizer),
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        unk_id=tokenizer.unk_token_id,
        files_sha256=tokenizer_files_sha256(Path(tokenizer_dir)),
    )
