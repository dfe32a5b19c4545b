"""Export round trip: the exported HF directory gives the training-time student's logits, and
``pipeline.evaluate`` reads both a checkpoint (2 ranks, ZeRO-3) and the exported directory."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, launch_ranks, logs, rank_env, wait_ranks

pytestmark = pytest.mark.multiprocess


def test_export_round_trip_and_evaluate(ref_run, tmp_path, tiny_data):
    work, cfg, _ = ref_run
    ckpts = work / "run" / "checkpoints"
    # training-time student: the ZeRO-3 engine on the ranks that saved it, loaded from the checkpoint
    dump = tmp_path / "engine_logits.pt"
    same_batches = ["--max-batches", "3", "--micro-batch-size", "2"]  # 6 sequences: rank 1 has 2, then none
    procs = launch_ranks(2, ["--checkpoint", str(ckpts), "--dump-logits", str(dump), *same_batches],
                         tmp_path / "eval", module="pipeline.evaluate")
    assert wait_ranks(procs, tmp_path / "eval", 240) == [0, 0], logs(tmp_path / "eval")
    assert "perplexity" in (tmp_path / "eval" / "rank0.log").read_text()

    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "pipeline.export", "--checkpoint", str(ckpts), "--out", str(out)],
                       cwd=REPO, env=rank_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    # the export carries the training data's tokenizer, and says so in its marker
    from pipeline.export import read_marker
    from shd_common.manifest import read_manifest, tokenizer_files_sha256

    data_tokenizer = read_manifest(tiny_data[1]).tokenizer.files_sha256
    assert tokenizer_files_sha256(out) == data_tokenizer
    assert read_marker(out)["tokenizer_sha256"] == data_tokenizer and read_marker(out)["step"] == 10

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = torch.load(dump)
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).vocab_size == model.config.vocab_size

    # data dir and seq_len come from the export's training_config.yaml
    r = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(out), *same_batches],
                       cwd=REPO, env=rank_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("perplexity ")
    # the 2-rank checkpoint evaluated from one process (its shards consolidated): the export's number
    one = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(ckpts), *same_batches],
                         cwd=REPO, env=rank_env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    assert "saved by 2 ranks" in one.stderr
    ppl = [float(re.search(r"^perplexity (\S+)", x, re.M).group(1))
           for x in (r.stdout, one.stdout, (tmp_path / "eval" / "rank0.log").read_text())]
    # ... and the number the 2 ranks printed: --max-batches counts for the whole job (issue 24 case 11)
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6) and ppl[1] == pytest.approx(ppl[2], rel=1e-5), ppl
