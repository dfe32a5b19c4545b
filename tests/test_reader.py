"""pipeline.data.reader.PackedSampleReader: packing, shuffling, exact resume (also across world sizes), checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import make_tiny_corpus_shards
from deepspeed.runtime.data_pipeline.data_sampling.indexed_dataset import MMapIndexedDataset

from pipeline.data.reader import DataError, PackedSampleReader, read_manifest, tokenizer_identity

SEQ = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tiny_corpus_shards(tmp_path_factory.mktemp("reader"), seq_len=SEQ)


def _stream(data_dir: Path, split: str) -> np.ndarray:
    """The split's tokens in order, read by DeepSpeed's MMapIndexedDataset."""
    parts = []
    for shard in read_manifest(data_dir).split_shards(split):
        dataset = MMapIndexedDataset(str(data_dir / shard.name), skip_warmup=True)
        parts += [np.array(dataset[i], dtype=np.int64) for i in range(len(dataset))]
    return np.concatenate(parts)


def test_samples_are_packed_windows_and_epochs_are_permutations(shards: tuple[Path, Path]) -> None:
    tokenizer_dir, data_dir = shards
    stream = _stream(data_dir, "train")
    reader = PackedSampleReader(data_dir, seq_len=SEQ, seed=3, model_vocab_size=400)
    assert reader.num_samples == (len(stream) - 1) // SEQ
    assert read_manifest(data_dir).tokenizer == tokenizer_identity(tokenizer_dir)
    n = reader.num_samples
    rows = torch.cat([reader.next_batch(n // 4) for _ in range(8)])  # two epochs (n may not divide by 4)
    windows = {tuple(stream[j * SEQ:j * SEQ + SEQ + 1]): j for j in range(n)}
    starts = [windows[tuple(r.tolist())] for r in rows]
    first, second = starts[:n], starts[n:2 * n]
    assert sorted(first) == list(range(n)) and first != sorted(first)
    assert second[:len(rows) - n] != first[:len(rows) - n]  # a new permutation each epoch
    assert rows.dtype == torch.int64 and rows.shape[1] == SEQ + 1
    again = PackedSampleReader(data_dir, seq_len=SEQ, seed=3)
    assert torch.equal(again.next_batch(n // 4), rows[:n // 4])  # deterministic from (seed, epoch)


def test_resume_from_state_dict_is_exact(shards: tuple[Path, Path]) -> None:
    _, data_dir = shards
    reader = PackedSampleReader(data_dir, seq_len=SEQ, seed=1)
    steps = reader.num_samples // 5 + 3  # the continuation crosses an epoch boundary
    for _ in range(steps):
        reader.next_batch(5)
    state = reader.state_dict()
    expected = [reader.next_batch(5) for _ in range(6)]
    resumed = PackedSampleReader(data_dir, seq_len=SEQ, seed=1)
    resumed.load_state_dict(state)
    assert state["consumed_samples"] == steps * 5
    for batch in expected:
        assert torch.equal(resumed.next_batch(5), batch)


def test_world_size_change_keeps_global_order(shards: tuple[Path, Path]) -> None:
    _, data_dir = shards
    ranks = [PackedSampleReader(data_dir, seq_len=SEQ, seed=2, dp_rank=r, dp_world_size=2) for r in range(2)]
    for _ in range(3):
        for rank in ranks:
            rank.next_batch(2)
    assert ranks[0].state_dict() == ranks[1].state_dict()
    single = PackedSampleReader(data_dir, seq_len=SEQ, seed=2)
    single.load_state_dict(ranks[0].state_dict())
    for _ in range(4):
        assert torch.equal(single.next_batch(4), torch.cat([rank.next_batch(2) for rank in ranks]))


def test_eval_batches_are_unshuffled_and_equal_across_ranks(shards: tuple[Path, Path]) -> None:
    _, data_dir = shards
    stream = _stream(data_dir, "val")
    ranks = [PackedSampleReader(data_dir, split="val", seq_len=SEQ, dp_rank=r, dp_world_size=2) for r in range(2)]
    per_rank = [list(r.eval_batches(2)) for r in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == -(-ranks[0].num_samples // 4)  # the last batch may be partial
    rows = torch.cat([row for batch in zip(*per_rank) for row in batch])
    assert len(rows) == ranks[0].num_samples  # every sample, once, in order
    for j, row in enumerate(rows):
        assert row.tolist() == stream[j * SEQ:j * SEQ + SEQ + 1].tolist()
    one, two = [list(r.eval_batches(2, max_batches=1)) for r in ranks]
    assert [len(b) for b in one + two] == [2, 0]  # max_batches counts for the whole job: rank 1 gets none
    assert ranks[0].consumed_samples == 0
    with pytest.raises(DataError, match="max_batches >= 1"):
        list(ranks[0].eval_batches(2, max_batches=0))


def test_state_of_other_settings_is_refused(shards: tuple[Path, Path]) -> None:
    _, data_dir = shards
    state = PackedSampleReader(data_dir, seq_len=SEQ, seed=0).state_dict()
    for other in (dict(seq_len=SEQ * 2), dict(seq_len=SEQ, seed=1), dict(seq_len=SEQ, split="val")):
        with pytest.raises(DataError, match="resume with the same data"):
            PackedSampleReader(data_dir, **other).load_state_dict(state)


def test_open_checks(shards: tuple[Path, Path], tmp_path: Path) -> None:
    _, data_dir = shards
    with pytest.raises(DataError, match="does not fit the model"):
        PackedSampleReader(data_dir, seq_len=SEQ, model_vocab_size=399)
    with pytest.raises(DataError, match="no 'test' shards"):
        PackedSampleReader(data_dir, split="test", seq_len=SEQ)
    with pytest.raises(DataError, match="manifest"):
        PackedSampleReader(tmp_path, seq_len=SEQ)


@pytest.mark.parametrize("damage", ["truncate", "flip", "idx"])
def test_corrupt_shard_is_named(shards: tuple[Path, Path], tmp_path: Path, damage: str) -> None:
    _, original = shards
    data_dir = tmp_path / "copy"
    data_dir.mkdir()
    for path in original.iterdir():
        (data_dir / path.name).write_bytes(path.read_bytes())
    shard = read_manifest(data_dir).split_shards("train")[1]
    target = shard.idx_path(data_dir) if damage == "idx" else shard.bin_path(data_dir)
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[:-2]
    else:
        data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DataError, match=str(target)):
        PackedSampleReader(data_dir, seq_len=SEQ)
    if damage == "flip":  # same size: only the checksum can tell
        PackedSampleReader(data_dir, seq_len=SEQ, verify_checksums=False)
