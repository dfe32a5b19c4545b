"""data_prep: tokenizer training, sharding, resume after a kill, and input errors, on real tiny data."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from data_fixtures import make_tokenizer, tiny_documents, write_jsonl
from deepspeed.runtime.data_pipeline.data_sampling.indexed_dataset import MMapIndexedDataset
from transformers import AutoTokenizer

from data_prep.corpora import stdlib_files
from data_prep.documents import InputReport
from data_prep.merge import merge_tasks
from data_prep.shard import SLEEP_AFTER_SHARD_ENV, ShardOptions, build_shards, split_of
from data_prep.sources import resolve_input
from data_prep.tokenizer import TokenizerTrainOptions, train_tokenizer
from pipeline.data.reader import PackedSampleReader, tokenizer_identity
from shd_common.manifest import DataError, load_manifest, read_manifest, write_manifest
from shd_common.shards import ShardWriter, token_dtype

REPO = Path(__file__).resolve().parents[1]
DOCS = tiny_documents(80)
TRICKY = ["naïve café 日本語 😀\n\n\tindented\r\nline", "digits 0123456789 3.14", "   ", "\n\n", "x</s>y<s>",
          "trailing spaces   \n", "\u00a0nbsp and \u200bzero width", "emoji 👩‍👩‍👧 family"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"), DOCS)


def _shard(tmp_path: Path, tokenizer_dir: Path, docs: list[str], name: str = "data", **kwargs) -> Path:
    corpus = write_jsonl(tmp_path / f"{name}.jsonl", docs)
    out = tmp_path / name
    build_shards(ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=out, **kwargs))
    return out


def _split_docs(manifest_dir: Path, split: str) -> list[np.ndarray]:
    """Every document of a split, in shard order, read by DeepSpeed's own MMapIndexedDataset."""
    docs = []
    for shard in read_manifest(manifest_dir).split_shards(split):
        dataset = MMapIndexedDataset(str(manifest_dir / shard.name), skip_warmup=True)
        assert list(dataset.doc_idx) == list(range(len(dataset) + 1))
        docs += [np.array(dataset[i]) for i in range(len(dataset))]
    return docs


# --- tokenizer ---------------------------------------------------------------------------------------------

def test_tokenizer_is_deterministic_and_llama_like(tmp_path: Path, tokenizer_dir: Path) -> None:
    again = make_tokenizer(tmp_path, DOCS)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert hf.convert_ids_to_tokens(3) == "<pad>" and len(hf) == sp.get_piece_size() == 400
    for text in TRICKY + DOCS[:20]:
        ids = hf.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ids == sp.encode(text), text
        assert hf.decode(ids) == sp.decode(ids) == text
    digit_pieces = [p for p in sp.encode("year 2024 and 31337", out_type=str) if any(c.isdigit() for c in p)]
    assert all(len(p.strip("▁")) == 1 for p in digit_pieces)  # split digits
    assert sp.encode("€", out_type=str) != ["<unk>"]  # byte fallback, no unknowns


def test_sampled_tokenizer_training_is_identical_across_processes(tmp_path: Path) -> None:
    """--max-sentences below the line count: the sample (and so the tokenizer) is the same in two
    separate processes, and another --seed samples other lines. (SentencePiece's own sampling drew
    differently in every process; the sample is now drawn by data_prep.tokenizer.sample_lines.)"""
    from data_prep.tokenizer import sample_lines

    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    lines = [line for doc in DOCS for line in doc.split("\n") if line.strip()]
    assert len(lines) > 200

    def train(name: str, seed: int) -> bytes:
        subprocess.run([sys.executable, "-m", "data_prep.tokenizer", "train", "--input", str(corpus), "--vocab-size",
                        "400", "--max-sentences", "200", "--seed", str(seed), "--out", str(tmp_path / name)],
                       check=True, capture_output=True, cwd=REPO)
        return (tmp_path / name / "tokenizer.model").read_bytes()

    assert train("a", 0) == train("b", 0)
    sample = sample_lines(iter(lines), 200, 0)
    assert sample == sample_lines(lines, 200, 0) != sample_lines(lines, 200, 1)
    remaining = iter(lines)
    assert len(sample) == 200 and all(line in remaining for line in sample)  # a subsequence: input order
    assert sample_lines(lines[:50], 200, 0) == lines[:50]


def test_tokenizer_refuses_existing_output(tmp_path: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(DataError, match="--overwrite"):
        train_tokenizer(TokenizerTrainOptions(inputs=(str(tmp_path),), out=tokenizer_dir, vocab_size=400))
    with pytest.raises(DataError, match="--vocab-size"):
        TokenizerTrainOptions(inputs=("x",), out=tmp_path, vocab_size=100)


# --- shards ------------------------------------------------------------------------------------------------

def test_round_trip_through_deepspeed_and_reader(tmp_path: Path, tokenizer_dir: Path) -> None:
    docs = DOCS + TRICKY + [""]
    out = _shard(tmp_path, tokenizer_dir, docs, val_fraction=0.2, shard_tokens=700)
    manifest = read_manifest(out)
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert manifest.dtype == "uint16" and manifest.tokenizer == tokenizer_identity(tokenizer_dir)
    assert len(manifest.split_shards("train")) > 2 and manifest.split_shards("val")
    for split in ("train", "val"):
        expected = [d for d in docs if d and split_of(d, 0, 0.2) == split]
        stored = _split_docs(out, split)
        assert [hf.decode(d[:-1]) for d in stored] == expected  # in input order, unicode and blank lines intact
        assert all(d[-1] == hf.eos_token_id for d in stored)
        assert [list(d[:-1]) for d in stored] == [
            hf.encode(t, add_special_tokens=False, split_special_tokens=True) for t in expected]
        # The reader's unshuffled stream is the same tokens, packed across documents and shards.
        reader = PackedSampleReader(out, split=split, seq_len=16)
        rows = list(reader.eval_batches(micro_batch_size=1))
        stream = np.concatenate([r[0, :-1].numpy() for r in rows] + [rows[-1][0, -1:].numpy()])
        assert np.array_equal(stream, np.concatenate(stored)[:len(stream)])
    assert manifest.stats["input"] == {"empty_documents": {"count": 1, "first": [f"{tmp_path}/data.jsonl:89"]}}
    assert sum(s.documents for s in manifest.shards) == len([d for d in docs if d])


@pytest.mark.parametrize("vocab_size", [32000, 128256])
def test_shard_writer_format_matches_deepspeed(tmp_path: Path, vocab_size: int) -> None:
    dtype = token_dtype(vocab_size)
    assert dtype == (np.uint16 if vocab_size <= 65536 else np.int32)
    docs = [np.array([5, vocab_size - 1, 2]), np.array([2]), np.arange(1000) % vocab_size]
    writer = ShardWriter(tmp_path / "train-00000", dtype)
    for doc in docs:
        writer.add(doc)
    bin_digest, idx_digest = writer.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-00000.bin", "train-00000.idx"]
    assert bin_digest.bytes == (tmp_path / "train-00000.bin").stat().st_size == 1004 * dtype.itemsize
    assert idx_digest.sha256 == hashlib.sha256((tmp_path / "train-00000.idx").read_bytes()).hexdigest()
    dataset = MMapIndexedDataset(str(tmp_path / "train-00000"), skip_warmup=True)
    assert dataset.dtype == dtype and list(dataset.doc_idx) == [0, 1, 2, 3]
    assert all(np.array_equal(dataset[i], doc) for i, doc in enumerate(docs))


def test_workers_do_not_change_output(tmp_path: Path, tokenizer_dir: Path) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    one, two = tmp_path / "one", tmp_path / "two"
    for out, workers in ((one, 1), (two, 2)):
        build_shards(ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=out, val_fraction=0.1,
                                  shard_tokens=500, workers=workers))
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert filecmp.cmpfiles(one, two, names, shallow=False)[0] == names


def _shard_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "data_prep.shard", *args], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_kill_and_resume_matches_uninterrupted_run(tmp_path: Path, tokenizer_dir: Path) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    args = ["--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--val-fraction", "0.1",
            "--shard-tokens", "600"]
    reference = tmp_path / "reference"
    build_shards(ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=reference, val_fraction=0.1,
                              shard_tokens=600))
    out = tmp_path / "killed"
    proc = _shard_cli([*args, "--out", str(out)], {SLEEP_AFTER_SHARD_ENV: "30"})
    deadline = time.time() + 60
    while time.time() < deadline:  # kill while it sleeps after committing its first shard
        if (out / "manifest.json").is_file() and load_manifest(out, require_complete=False).shards:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = load_manifest(out, require_complete=False)
    assert len(partial.shards) == 1 and not partial.complete
    with pytest.raises(DataError, match="resume"):
        read_manifest(out)
    first = partial.shards[0].bin_path(out)
    (out / "train-00007.bin.tmp").write_bytes(b"half-written")  # debris of a kill mid-shard
    first_mtime = first.stat().st_mtime_ns

    resumed = _shard_cli([*args, "--out", str(out), "--workers", "2"])
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert (out / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    assert filecmp.cmpfiles(reference, out, names, shallow=False)[0] == names
    assert first.stat().st_mtime_ns == first_mtime  # the completed shard was reused, not rewritten


def test_refuses_other_options_unless_overwrite(tmp_path: Path, tokenizer_dir: Path) -> None:
    out = _shard(tmp_path, tokenizer_dir, DOCS[:20])
    corpus = tmp_path / "data.jsonl"
    options = dict(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=out)
    before = (out / "manifest.json").read_bytes()
    build_shards(ShardOptions(**options, workers=2))  # same output settings: already complete
    assert (out / "manifest.json").read_bytes() == before
    with pytest.raises(DataError, match="different options.*--overwrite"):
        build_shards(ShardOptions(**options, seed=1))
    assert build_shards(ShardOptions(**options, seed=1, overwrite=True)).options["seed"] == 1
    other_tokenizer = tmp_path / "other_tokenizer"
    shutil.copytree(tokenizer_dir, other_tokenizer)
    with open(other_tokenizer / "tokenizer_config.json", "a") as f:
        f.write("\n")  # same ids, but not the same files: the data would no longer say what made it
    with pytest.raises(DataError, match="different tokenizer"):
        build_shards(ShardOptions(**{**options, "tokenizer": other_tokenizer}, seed=1))
    with pytest.raises(DataError, match="not empty"):
        build_shards(ShardOptions(**{**options, "out": tmp_path}))


def _checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file directly in `directory`, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _old_output(tmp_path: Path, tokenizer_dir: Path) -> tuple[Path, dict[str, str]]:
    """A complete shard directory with several shards and a file of the user's, and its checksums."""
    out = _shard(tmp_path, tokenizer_dir, DOCS[:15], name="old", val_fraction=0.2, shard_tokens=400)
    (out / "NOTES.txt").write_text("the user's own file")
    assert len(read_manifest(out).split_shards("train")) == 3
    return out, _checksums(out)


def _new_output(tmp_path: Path, tokenizer_dir: Path, out: Path) -> tuple[ShardOptions, dict[str, str]]:
    """Options that replace `_old_output`'s shards in `out` (2 train and 1 val: train-00002 must go), and the
    checksums `out` must then have: those of a fresh run elsewhere, plus the user's file."""
    corpus = write_jsonl(tmp_path / "new.jsonl", DOCS[:20])
    options = ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=out, val_fraction=0.2,
                           shard_tokens=1000)
    reference = tmp_path / "reference"
    build_shards(options.replace(out=reference))
    assert "train-00002.bin" not in _checksums(reference)
    return options, {**_checksums(reference), "NOTES.txt": _checksums(out)["NOTES.txt"]}


def _unusable_input(tmp_path: Path, kind: str) -> Path:
    if kind == "parquet without the text column":
        pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "bad.parquet")
        return tmp_path / "bad.parquet"
    if kind == "jsonl without the text field":
        return write_jsonl(tmp_path / "bad.jsonl", ["a", "b"], text_field="body")
    (tmp_path / "blank.txt").write_text("")
    return tmp_path / "blank.txt"


@pytest.mark.parametrize("kind, message", [
    ("parquet without the text column", "bad.parquet: no column 'text'.*--text-field"),
    ("jsonl without the text field", "no documents in the inputs.*missing text field: 2"),
    ("no documents", "no documents in the inputs"),
])
def test_overwrite_with_unusable_input_keeps_the_old_output(tmp_path: Path, tokenizer_dir: Path, kind: str,
                                                            message: str) -> None:
    out, before = _old_output(tmp_path, tokenizer_dir)
    bad = _unusable_input(tmp_path, kind)
    with pytest.raises(DataError, match=message):
        build_shards(ShardOptions(inputs=(str(bad),), tokenizer=tokenizer_dir, out=out, overwrite=True))
    assert _checksums(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)  # no staging left
    assert read_manifest(out).complete
    assert PackedSampleReader(out, split="train", seq_len=16).num_samples > 0  # sha256 of every shard checked


class _Killed(BaseException):
    """Raised in place of a rename or delete: the process dies there (nothing after it runs)."""


def _dies_at(step: int, root: Path, options: ShardOptions, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run `build_shards(options)` but die at its rename or delete number `step` (from 0) under `root`;
    False when the run finished before that step."""
    real_replace, real_unlink, done = os.replace, os.unlink, [0]

    def die_at_step(real, *paths: str) -> None:
        if any(Path(p).is_relative_to(root) for p in paths):
            done[0] += 1
            if done[0] > step:
                raise _Killed
        real(*paths)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", lambda src, dst: die_at_step(real_replace, src, dst))
        patch.setattr(os, "unlink", lambda path: die_at_step(real_unlink, path))
        try:
            build_shards(options)
        except _Killed:
            return True
    return False


def test_overwrite_killed_at_any_step_is_finished_by_the_same_command(tmp_path: Path, tokenizer_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Die at each rename/delete of an --overwrite run in turn: --out is always the complete old output or
    marked incomplete (never a mix), and running the same command again gives exactly the new output. The
    last round is an uninterrupted run: the new output replaces the old, the user's file stays, no staging."""
    out, before = _old_output(tmp_path, tokenizer_dir)
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    new, expected = _new_output(tmp_path, tokenizer_dir, out)
    command = new.replace(overwrite=True)
    step, seen_incomplete = 0, False
    while True:
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        if not _dies_at(step, out, command, monkeypatch):
            break
        complete = load_manifest(out, require_complete=False).complete
        if complete:
            current = _checksums(out)
            assert {name: current[name] for name in before} == before, step
        else:
            seen_incomplete = True
            with pytest.raises(DataError, match="has not finished.*run the same"):
                read_manifest(out)
        # An interrupted swap is finished with or without --overwrite; a kill before it needs --overwrite.
        build_shards(new if not complete and step % 2 else command)
        assert _checksums(out) == expected and sorted(p.name for p in out.iterdir()) == sorted(expected), step
        step += 1
    assert seen_incomplete and step >= 20, step  # 10 steps build the new output, 10 swap it in
    assert _checksums(out) == expected and sorted(p.name for p in out.iterdir()) == sorted(expected)


# --- inputs ------------------------------------------------------------------------------------------------

def test_bad_records_are_counted_or_strict(tmp_path: Path, tokenizer_dir: Path) -> None:
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_bytes(b'{"text": "good one"}\n{"body": "no text"}\nnot json\n\n{"text": "bad \xff byte"}\n'
                       b'{"text": ""}\n{"text": 5}\n{"text": "last"}\n')
    out = tmp_path / "out"
    manifest = build_shards(ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=out, val_fraction=0))
    counts = manifest.stats["input"]
    assert counts["missing_text_field"] == {"count": 2, "first": [f"{corpus}:2", f"{corpus}:7"]}
    assert counts["invalid_json"] == {"count": 1, "first": [f"{corpus}:3"]}
    assert counts["replaced_undecodable_bytes"]["first"] == [f"{corpus}:5"]
    assert counts["empty_documents"]["count"] == 1
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert [hf.decode(d[:-1]) for d in _split_docs(out, "train")] == ["good one", "bad \ufffd byte", "last"]
    strict_out = tmp_path / "strict"
    with pytest.raises(DataError, match=f"{corpus}:2: missing text field"):
        build_shards(ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=strict_out, strict=True))
    with pytest.raises(DataError, match="has not finished"):  # nothing half-written looks complete
        read_manifest(strict_out)


def test_input_kinds(tmp_path: Path, tokenizer_dir: Path) -> None:
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "b.txt").write_text("second file")
    (tmp_path / "dir" / "sub" / "a.txt").write_text("first\n\nfile ü")
    (tmp_path / "dir" / "skip.md").write_text("not an input type")
    pq.write_table(pa.table({"text": ["p1", None, "p2"]}), tmp_path / "t.parquet")
    datasets.Dataset.from_dict({"text": ["d1", "d2"]}).save_to_disk(str(tmp_path / "saved"))
    inputs = (str(tmp_path / "dir"), str(tmp_path / "saved"), str(tmp_path / "*.parquet"))
    out = tmp_path / "out"
    manifest = build_shards(ShardOptions(inputs=inputs, tokenizer=tokenizer_dir, out=out, val_fraction=0))
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert [hf.decode(d[:-1]) for d in _split_docs(out, "train")] == [
        "second file", "first\n\nfile ü", "d1", "d2", "p1", "p2"]
    assert manifest.stats["input"]["missing_text_field"] == {"count": 1, "first": [f"{tmp_path}/t.parquet#row1"]}
    with pytest.raises(DataError, match="no column 'body'.*--text-field"):
        list(resolve_input(str(tmp_path / "t.parquet")).documents("body", InputReport()))


def test_python_stdlib_corpus_needs_no_network() -> None:
    source = resolve_input("python-stdlib")
    description = source.describe()
    assert description["files"] == len(stdlib_files()) > 500
    first = next(source.documents("text", InputReport()))
    assert first.origin.startswith("python-stdlib:") and first.origin.endswith(".py") and first.text


@pytest.mark.parametrize("inputs, message", [
    (["missing/file.txt"], "no such file or directory"),
    (["python-stdlb"], "unknown input 'python-stdlb'.*python-stdlib"),
    (["someowner/no-such-dataset"], "cannot load Hugging Face dataset 'someowner/no-such-dataset'"),
    (["EMPTY"], "no documents in the inputs"),
])
def test_cli_errors_are_one_clear_line(tmp_path: Path, tokenizer_dir: Path, inputs: list[str], message: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    inputs = [str(empty) if i == "EMPTY" else i for i in inputs]
    proc = _shard_cli(["--input", *inputs, "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out")],
                      {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), stderr
    if (tmp_path / "out" / "manifest.json").exists():
        assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]


def test_options_are_validated_once_naming_the_flag(tmp_path: Path) -> None:
    """The options sections (shd_common.settings, as the run config): a wrong type, a bad value, an
    unknown or missing option is a DataError naming the flag, from Python as from the command line;
    `replace` validates the copy; the optional ints of a multi-task run parse as ints."""
    base = {"inputs": ("x",), "tokenizer": tmp_path, "out": tmp_path / "out"}
    with pytest.raises(DataError, match=r"^--workers: expected an int, got '2'$"):
        ShardOptions(**base, workers="2")
    with pytest.raises(DataError, match=r"--val-fraction 1.0: must be in \[0, 1\)"):
        ShardOptions(**base, val_fraction=1)
    with pytest.raises(DataError, match="unknown option 'worker'"):
        ShardOptions(**base, worker=2)
    with pytest.raises(DataError, match="--out: required"):
        ShardOptions(inputs=("x",), tokenizer=tmp_path)
    options = ShardOptions(**base)
    with pytest.raises(DataError, match="--task-index and --task-count"):
        options.replace(task_index=0)
    assert options.replace(task_index=1, task_count=3).task_count == 3 and options.task_count is None
    with pytest.raises(DataError, match="--vocab-size 10: at least"):
        TokenizerTrainOptions(inputs=("x",), out=tmp_path, vocab_size=10)


def test_tokenizer_overwrite_with_unusable_input_keeps_the_old_one(tmp_path: Path, tokenizer_dir: Path) -> None:
    out = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, out)
    before = _checksums(out)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["a", "b"], text_field="body")
    with pytest.raises(DataError, match="no text in the inputs.*--text-field.*missing text field: 2"):
        train_tokenizer(TokenizerTrainOptions(inputs=(str(bad),), out=out, vocab_size=400, overwrite=True))
    assert _checksums(out) == before


# --- issue 24, mechanism 6: tokenizer --overwrite is crash-safe (case 5) ---------------------------------------

def _tokenizer_sha(directory: Path) -> str:
    from shd_common.manifest import tokenizer_files_sha256

    return tokenizer_files_sha256(directory)


def test_tokenizer_overwrite_killed_at_any_step_keeps_a_tokenizer(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Die at each rename, exchange or delete of `tokenizer train --overwrite` in turn: --out always
    holds the old or the new tokenizer (the old code deleted the old files first: none), and the same
    command run again leaves exactly the new tokenizer with nothing beside it. A tokenizer directory
    this project did not make (no marker) is moved aside, not deleted."""
    from shd_common import safe_remove

    out = tmp_path / "tok"
    corpus = write_jsonl(tmp_path / "new.jsonl", DOCS[::-1] + ["zz qq xx " * 20])
    command = TokenizerTrainOptions(inputs=(str(corpus),), out=out, vocab_size=420, overwrite=True)
    train_tokenizer(command.replace(out=tmp_path / "reference", overwrite=False))
    new = _tokenizer_sha(tmp_path / "reference")
    train_tokenizer(command.replace(inputs=(str(write_jsonl(tmp_path / "old.jsonl", DOCS)),), overwrite=False))
    old = _tokenizer_sha(out)
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    patched = ((os, "rename"), (os, "unlink"), (shutil, "rmtree"), (safe_remove, "_exchange"))
    step, killed = 0, True
    while killed:
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        calls = [0]

        def dies(real, calls=calls, step=step):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] > step:
                    raise _Killed
                return real(*args, **kwargs)
            return call

        with monkeypatch.context() as patch:
            for module, name in patched:
                patch.setattr(module, name, dies(getattr(module, name)))
            try:
                train_tokenizer(command)
                killed = False
            except _Killed:
                pass
        assert _tokenizer_sha(out) in (old, new) and tokenizer_identity(out).vocab_size in (400, 420), step
        train_tokenizer(command)  # the same command again finishes the job
        assert _tokenizer_sha(out) == new, step
        assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl", "old.jsonl", "pristine", "reference",
                                                              "tok"], step
        step += 1
    assert step >= 3  # the exchange, the delete of the old one, and the uninterrupted run
    (pristine / ".shd-made.json").unlink()  # a tokenizer someone else made: moved aside, not deleted
    shutil.rmtree(out)
    shutil.copytree(pristine, out)
    train_tokenizer(command)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("tok.moved-")]
    assert len(moved) == 1 and _checksums(moved[0]) == _checksums(pristine) and _tokenizer_sha(out) == new


# --- issue 24, mechanism 6: inputs identified by content (case 9, input appended) -------------------------------

def _edit_in_place(corpus: Path) -> None:
    """Change the first document's text, keeping the file's size (as an editor saving in place would)."""
    data = corpus.read_bytes()
    assert b"doc 0:" in data
    corpus.write_bytes(data.replace(b"doc 0:", b"DOC 0:", 1))
    assert len(corpus.read_bytes()) == len(data)


def test_resume_after_input_edited_in_place_is_refused(tmp_path: Path, tokenizer_dir: Path) -> None:
    """A run killed after some shards, then its input edited in place with the same size: the old code
    resumed (the first shards held the old text, the rest the new); now the edit is named and the fix
    is --overwrite, which rebuilds from the input as it is."""
    out = _shard(tmp_path, tokenizer_dir, DOCS[:20], shard_tokens=300)
    manifest = read_manifest(out)
    assert len(manifest.shards) >= 3
    write_manifest(replace(manifest, complete=False, shards=manifest.shards[:2],
                           stats={k: v for k, v in manifest.stats.items() if k == "fingerprints"}))  # killed
    corpus = tmp_path / "data.jsonl"
    _edit_in_place(corpus)
    options = ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=out, shard_tokens=300)
    with pytest.raises(DataError, match=rf"the input changed since these shards were written \({corpus}: content "
                                        r"changed\); pass --overwrite"):
        build_shards(options)
    rebuilt = build_shards(options.replace(overwrite=True))
    reference = build_shards(options.replace(out=tmp_path / "reference"))
    assert [s.bin.sha256 for s in rebuilt.shards] == [s.bin.sha256 for s in reference.shards]


def test_complete_output_checks_its_input_by_content(tmp_path: Path, tokenizer_dir: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A complete output whose input was edited in place (same size) was "already complete"; one whose
    input grew was refused for "different options". Both now say that the input changed, naming it."""
    out = _shard(tmp_path, tokenizer_dir, DOCS[:20])
    corpus = tmp_path / "data.jsonl"
    options = ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=out)
    os.utime(corpus)  # touched (or copied again), same bytes: still complete, not hashed as new
    build_shards(options)
    assert "already complete" in capsys.readouterr().err
    _edit_in_place(corpus)
    with pytest.raises(DataError, match=rf"input changed .*\({corpus}: content changed\)"):
        build_shards(options)
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(DataError, match=r"input changed") as refused:
        build_shards(options)
    assert "different options" not in str(refused.value)


# --- issue 24, mechanism 8: inputs read as what they are (case 10, .txt by line, one huge document) -------------

def _decoded_train_docs(out: Path, tokenizer_dir: Path) -> list[str]:
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [hf.decode(d[:-1]) for d in _split_docs(out, "train")]


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_is_read_as_an_array_of_documents(tmp_path: Path, tokenizer_dir: Path, indent: int | None) -> None:
    """A `.json` holding a JSON array (on one line, or pretty-printed) gives one document per element
    (records with the text field, or strings); it was read as JSON Lines: 1 document or none, exit 0."""
    records = [{"text": "first doc"}, {"text": "second, with ] and [ inside"}, "a plain string", {"id": 4}]
    corpus = tmp_path / "docs.json"
    corpus.write_text(json.dumps(records, indent=indent))
    manifest = build_shards(ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=tmp_path / "out",
                                         val_fraction=0))
    assert _decoded_train_docs(tmp_path / "out", tokenizer_dir) == ["first doc", "second, with ] and [ inside",
                                                                    "a plain string"]
    assert manifest.stats["input"]["missing_text_field"] == {"count": 1, "first": [f"{corpus.resolve()}[3]"]}
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))  # JSON Lines in .json
    assert [d.text for d in resolve_input(str(tmp_path / "lines.json")).documents("text", InputReport())] == \
        ["first doc", "second, with ] and [ inside"]
    corpus.write_text(json.dumps(records)[:-1])  # cut short: refused naming the file, not skipped silently
    with pytest.raises(DataError, match=rf"{corpus.resolve()}: not a valid JSON array"):
        list(resolve_input(str(corpus)).documents("text", InputReport()))


def test_txt_is_one_document_per_file_or_per_line(tmp_path: Path, tokenizer_dir: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """A `.txt` is one document (the summary says so and names --txt-documents line, which the old
    code had no way to ask for): with --txt-documents line each non-blank line is a document, and a
    multi-task run cuts such a file by lines like a .jsonl."""
    lines = [f"line document {i} " + "word " * (i % 5) for i in range(40)]
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(lines[:20]) + "\n\n" + "\r\n".join(lines[20:]) + "\n")
    options = ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=tmp_path / "whole", val_fraction=0)
    build_shards(options)
    assert len(_decoded_train_docs(tmp_path / "whole", tokenizer_dir)) == 1
    assert re.search(r"txt files read whole: 1 .*--txt-documents line", capsys.readouterr().err)
    by_line = options.replace(out=tmp_path / "by_line", txt_documents="line")
    build_shards(by_line)
    assert _decoded_train_docs(tmp_path / "by_line", tokenizer_dir) == lines
    for index in range(3):
        build_shards(by_line.replace(out=tmp_path / "tasks", task_index=index, task_count=3, unit_bytes=300))
    merge_tasks(tmp_path / "tasks")
    assert _decoded_train_docs(tmp_path / "tasks", tokenizer_dir) == lines
    with pytest.raises(DataError, match="--txt-documents lines: must be one of file, line"):
        options.replace(txt_documents="lines")


def test_one_huge_document_is_refused_with_its_size_and_the_fix(tmp_path: Path, tokenizer_dir: Path) -> None:
    """A document over --max-document-mb is refused before it is tokenized (the old code took ~100x its
    size in memory with the bar at "0doc"), naming it, its size and the fixes; raising the limit works."""
    corpus = tmp_path / "big.txt"
    corpus.write_text("word " * 60_000)  # 300 kB
    options = ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=tmp_path / "out", val_fraction=0,
                           max_document_mb=0.25)
    with pytest.raises(DataError, match=rf"{corpus.resolve()}: one document of 300,000 bytes \(0.3 MiB\), over "
                                        r"--max-document-mb 0.25: .*--txt-documents line.*raise --max-document-mb"):
        build_shards(options)
    records = tmp_path / "big.jsonl"
    write_jsonl(records, ["small", "word " * 60_000])
    with pytest.raises(DataError, match=rf"{records.resolve()}:2: one document of 300,000 characters"):
        build_shards(options.replace(inputs=(str(records),), out=tmp_path / "out2"))
    assert build_shards(options.replace(max_document_mb=1.0)).stats["documents"]["train"] == 1


def test_tokenizer_with_ids_beyond_its_length_gets_a_wide_enough_dtype(tmp_path: Path, tokenizer_dir: Path) -> None:
    """A vocabulary with a gap (an id of 70000 in a 400-entry tokenizer): the dtype was chosen from the
    tokenizer's length (uint16) and writing the id raised OverflowError; it is chosen from the largest id."""
    tok = shutil.copytree(tokenizer_dir, tmp_path / "gappy")
    (tok / "tokenizer.model").unlink()  # the HF files alone define it
    body = json.loads((tok / "tokenizer.json").read_text())
    vocab = body["model"]["vocab"]
    piece = max(vocab, key=vocab.get)
    vocab[piece] = 70000
    (tok / "tokenizer.json").write_text(json.dumps(body))
    out = _shard(tmp_path, tok, [f"a {piece.replace('▁', ' ')} b"] * 3, val_fraction=0)
    manifest = read_manifest(out)
    assert manifest.dtype == "int32" and manifest.tokenizer.vocab_size == 70001
    assert 70000 in np.concatenate(_split_docs(out, "train"))
