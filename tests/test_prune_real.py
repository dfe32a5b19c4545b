"""`python -m pipeline.prune` on a real pretrained teacher: SmolLM2-135M (30 layers, 9 heads, 3 kv
heads, hidden 576, MLP 1536, tied embeddings) pruned to 4 layers, 3 heads / 1 kv head, MLP 768 and
hidden 384 from 4 calibration batches of its own tokenizer's shards.

The student must load with from_pretrained as the teacher's class, its record must map every
student head to a teacher head of the one kept kv group, and, with no training at all, it must
still predict held-out text better than uniform guessing (loss below ln(vocab)): the kept units
carry the teacher's knowledge. (Measured: 10.11 against ln(49152) = 10.80.)
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.reader import PackedSampleReader
from pipeline.pruning.record import head_sources, layer_sources, read_record
from tests.helpers import REPO, rank_env
from tests.test_real_teacher import SEQ_LEN, smollm2, smollm2_data  # noqa: F401 -- fixtures

pytestmark = pytest.mark.real_teacher


def test_pruned_smollm2_loads_maps_its_heads_and_beats_uniform_guessing(smollm2, smollm2_data, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    done = subprocess.run([sys.executable, "-m", "pipeline.prune", "--teacher", str(smollm2), "--data",
                           str(smollm2_data), "--out", str(out), "--layers", "4", "--heads", "3", "--kv-heads", "1",
                           "--intermediate-size", "768", "--hidden-size", "384", "--calibration-batches", "4",
                           "--batch-size", "4", "--seq-len", str(SEQ_LEN)],
                          cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "student layer 0 <- teacher layer" in done.stdout

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and cfg.tie_word_embeddings
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
            cfg.hidden_size, cfg.head_dim) == (4, 3, 1, 768, 384, 64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    record = read_record(out)
    layers = layer_sources(record)
    assert len(layers) == 4 and layers == sorted(set(layers)) and all(0 <= t < 30 for t in layers)
    for entry, heads in zip(record["layers"], head_sources(record)):
        kv = entry["kv_heads"][0]["teacher_kv_head"]
        assert len(heads) == 3 and all(h // 3 == kv for h in heads)  # the kept group's own query heads
        assert [h["student_kv_head"] for h in entry["heads"]] == [0, 0, 0]
    assert record["teacher"]["model_type"] == "llama" and record["teacher"]["content_sha256"]

    reader = PackedSampleReader(smollm2_data, split="val", seq_len=SEQ_LEN)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in reader.eval_batches(4, max_batches=4):
            logits = model(input_ids=batch[:, :-1]).logits
            total += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
            count += batch[:, 1:].numel()
    loss = total / count
    assert math.isfinite(loss) and loss < math.log(cfg.vocab_size), loss
