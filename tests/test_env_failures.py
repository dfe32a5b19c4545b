"""Environment failures named (issue 24, mechanism 9): a full disk, a busy MASTER_PORT, ranks
that never all start, and a shard corrupted while training each end in one line that names the
place and the fix, with exit 2 and nothing complete lost.

A full disk is a real small tmpfs (mounting needs root: skipped with the reason otherwise).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, rank_env, tiny_config, write_config


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (e.g. "1600k"), unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _train(cfg: dict, work: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """One `python -m pipeline.train` process (a world of one unless env says otherwise)."""
    path = write_config(work / "config.yaml", cfg)
    return subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(path)], cwd=REPO,
                          env={**rank_env(), **env}, capture_output=True, text=True, timeout=timeout)


# ---- 1. a full disk -------------------------------------------------------------------------

def test_checkpoint_save_on_a_full_disk(tmp_path, small_disk, tiny_data):
    """Step 2's checkpoint (~1.1 MB) fits, step 4's does not: one line, exit 2, step 2 intact."""
    from pipeline.checkpoint import records as ckpt

    ck = small_disk("1600k") / "ck"
    cfg = tiny_config(tmp_path / "run", tiny_data, None, **{"optim.max_steps": 4, "checkpoint.every_steps": 2,
                                                           "checkpoint.dir": str(ck)})
    done = _train(cfg, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: no space left at {ck}: " in done.stderr and " bytes free; checkpoint step_00000004 is not " \
        "complete (resume ignores it) and the previous checkpoint step_00000002" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert [p.name for p in ckpt.complete_checkpoints(ck)] == ["step_00000002"]
    assert ckpt.verify(ck / "step_00000002") == []


def test_shard_write_on_a_full_disk(tmp_path, small_disk, tiny_data):
    """The shards completed before the disk filled stay listed and readable; the rerun resumes."""
    from tests.data_fixtures import tiny_documents, write_jsonl

    corpus = write_jsonl(tmp_path / "big.jsonl", tiny_documents(1200))
    out = small_disk("64k") / "data"
    cmd = [sys.executable, "-m", "data_prep.shard", "--input", str(corpus), "--tokenizer", str(tiny_data[0]),
           "--out", str(out), "--shard-tokens", "4000", "--val-fraction", "0", "--workers", "1"]
    done = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"error: no space left at {out}: " in done.stderr and "is not complete (manifest.json does not list " \
        "it) and the shards completed before it are kept" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    listed = json.loads((out / "manifest.json").read_text())["shards"]
    assert listed, "no shard was completed before the disk filled: make the tmpfs larger"
    for shard in listed:
        assert (out / f"{shard['name']}.bin").stat().st_size == shard["bin"]["bytes"]


def test_export_on_a_full_disk_keeps_the_earlier_export(tmp_path, small_disk, tiny_data, capsys):
    """A second export into a disk that holds only one: the first stays byte for byte."""
    from pipeline import export

    cfg = tiny_config(tmp_path / "run", tiny_data, None, **{"optim.max_steps": 2})
    done = _train(cfg, tmp_path)
    assert done.returncode == 0, done.stderr
    disk = small_disk("2m")
    out = disk / "model"
    assert export.main(["--checkpoint", str(tmp_path / "run" / "checkpoints"), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    room = shutil.disk_usage(disk).free - sum(map(len, before.values())) // 2  # half an export left
    (disk / "filler").write_bytes(b"\0" * room)
    code = export.main(["--checkpoint", str(tmp_path / "run" / "checkpoints"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: no space left at {disk}: " in err and f"the export was not written and --out {out} is as " \
        "it was" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---- 2., 3. the rendezvous ------------------------------------------------------------------

def test_busy_master_port_is_refused_at_once(tmp_path, tiny_data):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = tiny_config(tmp_path / "run", tiny_data, None)
        started = time.monotonic()
        done = _train(cfg, tmp_path, timeout=60, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert done.returncode == 2, done.stderr
    assert f"error: MASTER_PORT {port} on 127.0.0.1 is in use: set MASTER_PORT to a free port" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - started < 30


def test_missing_ranks_end_the_wait_with_the_variable_named(tmp_path, tiny_data):
    """RANK=0 WORLD_SIZE=2 and one process: SHD_RENDEZVOUS_TIMEOUT_S=3 ends the wait in seconds."""
    from tests.helpers import free_port

    cfg = tiny_config(tmp_path / "run", tiny_data, None)
    done = _train(cfg, tmp_path, timeout=60, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()), SHD_RENDEZVOUS_TIMEOUT_S="3")
    assert done.returncode == 2, done.stderr
    assert "error: the ranks did not all start within 3 s (SHD_RENDEZVOUS_TIMEOUT_S): only 1 of WORLD_SIZE=2 " \
        "ranks joined. Start WORLD_SIZE processes (RANK 0 to 1), or correct WORLD_SIZE/RANK" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_rendezvous_timeout_setting(monkeypatch):
    from pipeline.runtime import distributed
    from shd_common.settings import ConfigError

    monkeypatch.delenv(distributed.RENDEZVOUS_TIMEOUT_ENV, raising=False)
    assert distributed.rendezvous_timeout_s() == 600
    monkeypatch.setenv(distributed.RENDEZVOUS_TIMEOUT_ENV, "2.5")
    assert distributed.rendezvous_timeout_s() == 2.5
    for bad in ("0", "-1", "ten", "inf", "nan"):
        monkeypatch.setenv(distributed.RENDEZVOUS_TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match="SHD_RENDEZVOUS_TIMEOUT_S"):
            distributed.rendezvous_timeout_s()


# ---- 4. a shard damaged while training ------------------------------------------------------

def _copy_of_data(tiny_data, tmp_path: Path):
    """A copy of the tiny data (to damage), its manifest and its first train shard's .bin."""
    from shd_common.manifest import read_manifest

    data = Path(shutil.copytree(tiny_data[1], tmp_path / "data"))
    manifest = read_manifest(data)
    return data, manifest, manifest.split_shards("train")[0].bin_path(data)


def _read_all(reader) -> None:
    for _ in range(2 * reader.num_samples):
        reader.next_batch(1)


def test_a_token_outside_the_vocabulary_names_the_shard_and_offset(tmp_path, tiny_data):
    """data.verify_checksums=false with a corrupted token: was an IndexError in the embedding."""
    from pipeline.data.reader import DataError, PackedSampleReader

    data, manifest, shard = _copy_of_data(tiny_data, tmp_path)
    tokens = np.memmap(shard, dtype=np.dtype(manifest.dtype), mode="r+")
    tokens[5] = manifest.tokenizer.vocab_size + 7
    tokens.flush()
    del tokens
    reader = PackedSampleReader(data, seq_len=32, verify_checksums=False)
    with pytest.raises(DataError) as refused:
        _read_all(reader)
    assert str(refused.value).startswith(f"{shard}: token {manifest.tokenizer.vocab_size + 7} at token offset 5 "
                                         f"(byte 10) is not below the vocabulary size "
                                         f"{manifest.tokenizer.vocab_size}: the shard is corrupt")


def test_a_shard_truncated_while_training_is_named(tmp_path, tiny_data):
    """Cut short after the reader opened it: a DataError, not SIGBUS; on resume as well."""
    from pipeline.data.reader import DataError, PackedSampleReader

    data, manifest, shard = _copy_of_data(tiny_data, tmp_path)
    reader = PackedSampleReader(data, seq_len=32, verify_checksums=False)
    state = reader.state_dict()
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    expected = f"{shard}: {size // 2} bytes, the manifest says {size}: the shard changed while training"
    with pytest.raises(DataError, match="the shard changed while training") as refused:
        _read_all(reader)
    assert str(refused.value).startswith(expected)
    with pytest.raises(DataError, match="the shard changed while training"):
        reader.load_state_dict(state)
