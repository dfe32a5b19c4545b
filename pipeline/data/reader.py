"""Training samples from `data_prep.shard` output: fixed-length, packed, shuffled, resumable.

A split's shards are read as one token stream (documents back to back, each ending in EOS). Sample
`j` is `stream[j*seq_len : j*seq_len + seq_len + 1]`: inputs and shifted targets in one row, the last
token shared with the next sample, as in Megatron and nanoGPT. Global sample index `g` maps to epoch
`g // num_samples` and a permutation of that epoch seeded by `(seed, epoch)`. The reader's position is
a count of consumed global samples, so it resumes exactly, also with another number of data-parallel
ranks: rank `r` of `w` takes the `r`-th block of `micro_batch_size` samples of every `w` blocks.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config.sections import DataConfig
from shd_common.integrity import sha256_file
from shd_common.manifest import DataError, Manifest, ShardRecord, TokenizerIdentity, read_manifest, tokenizer_identity
from shd_common.shards import IndexFormatError, read_index

__all__ = ["Batch", "DataConfig", "DataError", "Manifest", "PackedSampleReader", "TokenizerIdentity", "open_reader",
           "read_manifest", "split_tokens", "tokenizer_identity"]


@dataclass(frozen=True)
class Batch:
    """One micro-batch as the models take it (``split_tokens``); all [B, T]."""

    input_ids: torch.Tensor  # the inputs: tokens 0 .. T-1 of each sample
    labels: torch.Tensor  # the targets: tokens 1 .. T (each input's next token)
    valid: torch.Tensor  # bool: the label counts (CE, KD, perplexity); False past a padded row's end
    mask: torch.Tensor | None  # the key (attention) mask, 1 = real token; None = no padding (packed samples)

    def query_rows(self) -> torch.Tensor | float:
        """The number of real query rows (what a per-row attention loss averages over): a tensor
        with a mask (no host sync), else B * T."""
        return self.mask.sum() if self.mask is not None else float(self.input_ids.numel())


def split_tokens(tokens: torch.Tensor, device=None, lengths: torch.Tensor | None = None) -> Batch:
    """[B, T+1] samples -> a ``Batch``: inputs, labels, label validity and key mask (None: no padding).

    Packed samples are windows of the token stream and hold no padding: every token, document
    separators included, is an input, a key and a target. Padding is never inferred from a token id
    (many tokenizers set pad = eos, the separator); a right-padded batch passes ``lengths`` [B], the
    number of real tokens in each row of T+1, and gets a key mask and label validity from it.
    """
    if device is not None:
        tokens = tokens.to(device)
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    if lengths is None:
        return Batch(inp, labels, valid=torch.ones_like(labels, dtype=torch.bool), mask=None)
    positions = torch.arange(inp.shape[1], device=inp.device)
    lengths = lengths.to(inp.device).view(-1, 1)
    return Batch(inp, labels, valid=positions + 1 < lengths, mask=(positions < lengths).long())


def open_reader(data: DataConfig, split: str = "train", *, seed: int = 0, rank: int = 0, world: int = 1,
                model_vocab_size: int | None = None, verify_checksums: bool = False) -> PackedSampleReader:
    """The reader of one split of the run's data (the ``data`` section: its directory and seq_len)
    for data-parallel rank ``rank`` of ``world``; the one place a run opens its data. Shard
    checksums are compared with the manifest only when asked: the training reader asks
    (data.verify_checksums); the calibration pass, the evaluator and preflight do not."""
    return PackedSampleReader(data.dir, split=split, seq_len=data.seq_len, seed=seed, dp_rank=rank,
                              dp_world_size=world, verify_checksums=verify_checksums,
                              model_vocab_size=model_vocab_size)


def _open_shard(root: Path, shard: ShardRecord, dtype: np.dtype, verify_checksums: bool) -> np.ndarray:
    """The shard's tokens as a read-only memmap, after checking it against the manifest."""
    for path, digest in ((shard.bin_path(root), shard.bin), (shard.idx_path(root), shard.idx)):
        if not path.is_file():
            raise DataError(f"{path}: shard file missing")
        if path.stat().st_size != digest.bytes:
            raise DataError(f"{path}: {path.stat().st_size} bytes, the manifest says {digest.bytes} (truncated?)")
        if verify_checksums and sha256_file(path) != digest.sha256:
            raise DataError(f"{path}: sha256 differs from the manifest (corrupt shard)")
    try:
        index = read_index(shard.idx_path(root))
    except IndexFormatError as exc:
        raise DataError(str(exc)) from exc
    if index.dtype != dtype or len(index.sizes) != shard.documents or int(index.sizes.sum()) != shard.tokens:
        raise DataError(f"{shard.idx_path(root)}: index does not match the manifest's dtype/documents/tokens")
    return np.memmap(shard.bin_path(root), dtype=dtype, mode="r")


class _TokenStream:
    """Several shards' tokens as one indexable stream, checked as they are read: a shard cut short
    since it was opened (reading its memory map past the end would kill the process with SIGBUS)
    and a token id outside the vocabulary (an IndexError deep in the model) are DataErrors naming
    the file and the offset, also with data.verify_checksums=false."""

    def __init__(self, parts: list[np.ndarray], paths: list[Path], vocab_size: int) -> None:
        self._parts, self._paths, self._vocab_size = parts, paths, vocab_size
        self._starts = [0]
        for part in parts:
            self._starts.append(self._starts[-1] + len(part))

    def __len__(self) -> int:
        return self._starts[-1]

    def check_size(self, i: int) -> None:
        """Part `i`'s file still has the size it had when opened (checked against the manifest)."""
        path, expected = self._paths[i], self._parts[i].nbytes
        size = path.stat().st_size if path.is_file() else 0
        if size != expected:
            raise DataError(f"{path}: {size} bytes, the manifest says {expected}: the shard changed while "
                            f"training (truncated?); restore it or prepare the data again, then resume")

    def check_sizes(self) -> None:
        """Every part's file still has its size (on resume: a shard replaced between runs)."""
        for i in range(len(self._parts)):
            self.check_size(i)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens `[start, stop)` as int64, crossing shard boundaries as needed."""
        out = np.empty(stop - start, dtype=np.int64)
        i = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < stop:
            take = min(stop, self._starts[i + 1]) - pos
            offset = pos - self._starts[i]
            self.check_size(i)
            chunk = out[pos - start:pos - start + take]
            chunk[:] = self._parts[i][offset:offset + take]
            bad = np.flatnonzero(chunk >= self._vocab_size)
            if bad.size:
                at = offset + int(bad[0])
                raise DataError(f"{self._paths[i]}: token {int(chunk[bad[0]])} at token offset {at} (byte "
                                f"{at * self._parts[i].itemsize}) is not below the vocabulary size "
                                f"{self._vocab_size}: the shard is corrupt; prepare the data again (with "
                                f"data.verify_checksums=true the start-up check names such a shard)")
            pos += take
            i += 1
        return out


class PackedSampleReader:
    """Samples of `seq_len + 1` tokens from one split of a shard directory, for one data-parallel rank."""

    def __init__(self, data_dir: str | Path, *, split: str = "train", seq_len: int, seed: int = 0,
                 dp_rank: int = 0, dp_world_size: int = 1, verify_checksums: bool = True,
                 model_vocab_size: int | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len {seq_len}: must be >= 1")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_world_size={dp_world_size})")
        self.manifest = read_manifest(data_dir)
        vocab = self.manifest.tokenizer.vocab_size
        if model_vocab_size is not None and vocab > model_vocab_size:
            raise DataError(f"{self.manifest.path}: tokenizer vocabulary {vocab} does not fit the model's "
                            f"embedding of {model_vocab_size} rows")
        shards = self.manifest.split_shards(split)
        if not shards:
            raise DataError(f"{self.manifest.path}: no {split!r} shards (splits: "
                            f"{', '.join(sorted({s.split for s in self.manifest.shards}))})")
        dtype = np.dtype(self.manifest.dtype)
        self._stream = _TokenStream([_open_shard(self.manifest.root, s, dtype, verify_checksums) for s in shards],
                                    [s.bin_path(self.manifest.root) for s in shards], vocab)
        self.num_samples = (len(self._stream) - 1) // seq_len
        if self.num_samples < 1:
            raise DataError(f"{self.manifest.path}: {split!r} has {len(self._stream)} tokens, fewer than one "
                            f"sample of seq_len + 1 = {seq_len + 1}")
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.consumed_samples = 0
        self._data_sha256 = hashlib.sha256("".join(s.bin.sha256 for s in shards).encode()).hexdigest()
        self._permutation: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._permutation is None or self._permutation[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._permutation = (epoch, rng.permutation(self.num_samples))
        return self._permutation[1]

    def _sample(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return self._stream.read(start, start + self.seq_len + 1)

    def _rows(self, sample_indices: range | list[int]) -> torch.LongTensor:
        return torch.from_numpy(np.stack([self._sample(i) for i in sample_indices]))

    def next_batch(self, micro_batch_size: int) -> torch.LongTensor:
        """This rank's `[micro_batch_size, seq_len + 1]` block of the next global batch; all ranks advance."""
        first = self.consumed_samples + self.dp_rank * micro_batch_size
        indices = []
        for g in range(first, first + micro_batch_size):
            epoch, position = divmod(g, self.num_samples)
            indices.append(int(self._epoch_order(epoch)[position]))
        self.consumed_samples += micro_batch_size * self.dp_world_size
        return self._rows(indices)

    def eval_batches(self, micro_batch_size: int, max_batches: int | None = None) -> Iterator[torch.LongTensor]:
        """This rank's share of an unshuffled pass over the first `max_batches * micro_batch_size` samples
        of the split (all of them when None): the same samples for any number of ranks, so 1 or 8
        processes evaluate the same sequences. They are cut into global batches of `micro_batch_size`
        per rank, rank r taking the r-th block of each; in the last, partial one a rank's block may be
        short or empty ([0, seq_len + 1]), so every rank yields the same number of batches.
        """
        total = self.num_samples if max_batches is None else min(self.num_samples, max_batches * micro_batch_size)
        if total < 1:
            raise DataError(f"{self.manifest.path}: evaluating {max_batches} batches of {micro_batch_size} "
                            f"samples of {self.split!r} reads nothing: give max_batches >= 1 (or none for all)")
        per_batch = micro_batch_size * self.dp_world_size
        for b in range(-(-total // per_batch)):
            first = min(total, b * per_batch + self.dp_rank * micro_batch_size)
            rows = range(first, min(total, first + micro_batch_size))
            yield self._rows(rows) if rows else torch.empty((0, self.seq_len + 1), dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "seq_len": self.seq_len,
                "split": self.split, "num_samples": self.num_samples, "data_sha256": self._data_sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses a state of another seed, seq_len, split or data,
        and shards whose size changed since they were opened."""
        self._stream.check_sizes()
        mine = self.state_dict()
        for key in ("seed", "seq_len", "split", "num_samples", "data_sha256"):
            if state.get(key) != mine[key]:
                raise DataError(f"data reader state has {key}={state.get(key)!r} but this reader has {mine[key]!r}; "
                                "resume with the same data and data settings (or start a new run)")
        self.consumed_samples = int(state["consumed_samples"])
