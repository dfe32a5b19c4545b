"""Memory at realistic shapes, measured in real engine runs (``python -m pipeline.train`` on CPU ranks).

    python bench/teacher_scale.py big-teacher   # a ~1.6 GB fp32 teacher on 2 ranks: partitioned vs replicated
    python bench/teacher_scale.py vocab         # a 128 k vocabulary end to end: int32 shards, KD memory per chunk

``big-teacher``: a wide, shallow LLaMA teacher (hidden 4096, 32 heads / 8 kv heads, 2 layers, about
390 M parameters, 1.55 GB in fp32), larger than one rank's share, trained against on 2 ranks with
each ``teacher.placement``. Reported per rank: peak RSS of the whole process (``wait4``), and rank 0's
peak after loading the models and after the steps (the engine's log and metrics), and its anonymous
resident memory after loading (the peak RSS counts the memory-mapped checkpoint's pages, which
every rank touches while loading, whatever the placement).

``vocab``: a Hugging Face tokenizer directory with 131,072 entries (a word-level tokenizer built
here; nothing downloads), shards written by ``data_prep.shard`` (int32 tokens, since the ids do not
fit uint16), and a distillation run with a teacher and student of that vocabulary, once per
``distill.kd_chunk_size``: the step's extra memory must follow the chunk ([chunk, vocab] float32
buffers), not T x vocab.

Every run is a fresh set of processes; results go to ``--out`` (JSON) and a table on stdout. The
numbers are this machine's (2 CPU cores): peaks, not timings, are the point.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shd_common.cli import command_parser  # noqa: E402
from shd_common.settings import set_dotted  # noqa: E402

TINY_DS = ROOT / "ds_configs" / "zero3_tiny_cpu.json"


def build_tokenizer(out: Path, vocab_size: int) -> Path:
    """A word-level HF tokenizer with `vocab_size` entries: <unk> <s> </s> <pad>, then w0, w1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)
    return out


def build_data(work: Path, tokenizer: Path, vocab_size: int, docs: int, words: int) -> Path:
    """Random documents over the vocabulary (seeded), sharded by data_prep.shard."""
    from data_prep.shard import ShardOptions, build_shards

    rng = random.Random(0)
    corpus = work / "corpus.jsonl"
    with open(corpus, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(vocab_size - 4)}" for _ in range(words))}) + "\n")
    out = work / "data"
    build_shards(ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer, out=out, val_fraction=0.05,
                              shard_tokens=200_000))
    return out


def build_teacher(out: Path, vocab: int, hidden: int, layers: int, heads: int, kv: int, ffn: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                 max_position_embeddings=4096)).save_pretrained(out)
    return out


def run_engine(work: Path, cfg: dict, nproc: int) -> dict:
    """Run `nproc` ranks of pipeline.train on `cfg`; per-rank peak RSS and rank 0's figures."""
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(nproc):
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RANK=str(r),
                   LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(work / f"rank{r}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline.train", "--config", str(cfg_path)],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    peaks = []
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"run failed: see {work}/rank*.log")
        peaks.append(usage.ru_maxrss / 1024)
    text = (work / "rank0.log").read_text()
    after = text.split("memory after loading: peak ")[1]
    loaded, now = float(after.split(" MiB")[0]), float(after.split("now ")[1].split(" MiB")[0])
    metrics = [json.loads(line) for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "perf/peak_mem_mib" in m]
    placement = next((line for line in text.splitlines() if "| placement " in line), "")
    return {"peak_rss_mib_per_rank": peaks, "rank0_after_loading_mib": loaded, "rank0_anon_after_loading_mib": now,
            "rank0_after_steps_mib": steps[-1]["perf/peak_mem_mib"], "step_s": steps[-1]["perf/step_time_s"],
            "placement_line": placement.strip()}


def base_config(work: Path, data: Path, tokenizer: Path, teacher: Path, **over) -> dict:
    cfg = {
        "stage": "distill", "seed": 1, "output_dir": str(work / "run"), "teacher": {"path": str(teacher)},
        "student": {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 128,
                    "max_position_embeddings": 4096},
        "data": {"dir": str(data), "tokenizer_dir": str(tokenizer), "seq_len": 128, "micro_batch_size": 1},
        "distill": {"w_ce": 0.5, "w_kd": 0.5, "w_shd": 1.0, "plan": "select"},
        "optim": {"lr": 1e-3, "warmup_steps": 1, "max_steps": 3},
        "deepspeed": {"config": str(TINY_DS), "precision": "fp32"},
        "checkpoint": {"every_steps": 0, "save_at_end": False},
        "logging": {"every_steps": 1, "progress_bar": "off"},
        "eval": {"every_steps": 0, "at_end": False},
    }
    for key, value in over.items():
        set_dotted(cfg, key, value)
    return cfg


def big_teacher(out: Path, nproc: int) -> list[dict]:
    tok = build_tokenizer(out / "tokenizer", 4096)
    data = build_data(out, tok, 4096, docs=400, words=300)
    teacher = build_teacher(out / "teacher", 4096, hidden=4096, layers=2, heads=32, kv=8, ffn=11008)
    size = sum(f.stat().st_size for f in teacher.glob("*.safetensors"))
    rows = []
    for placement in ("partitioned", "replicated"):
        cfg = base_config(out / placement, data, tok, teacher, **{"teacher.placement": placement})
        rows.append({"experiment": "big-teacher", "placement": placement, "teacher_file_mib": size / 2**20,
                     **run_engine(out / placement, cfg, nproc)})
    return rows


def vocab(out: Path, chunks: list[int]) -> list[dict]:
    from pipeline.data.reader import read_manifest

    size = 131072
    tok = build_tokenizer(out / "tokenizer", size)
    data = build_data(out, tok, size, docs=200, words=400)
    dtype = read_manifest(data).dtype
    teacher = build_teacher(out / "teacher", size, hidden=64, layers=2, heads=8, kv=4, ffn=128)
    rows = []
    for chunk in chunks:
        cfg = base_config(out / f"chunk{chunk}", data, tok, teacher,
                          **{"distill.kd_chunk_size": chunk, "data.seq_len": 1024})
        rows.append({"experiment": "vocab", "vocab": size, "shard_dtype": dtype, "kd_chunk_size": chunk,
                     **run_engine(out / f"chunk{chunk}", cfg, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = command_parser("python bench/teacher_scale.py", __doc__)
    ap.add_argument("experiment", choices=("big-teacher", "vocab"))
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the big-teacher runs")
    ap.add_argument("--chunks", default="128,512,2048", help="distill.kd_chunk_size values of the vocab runs")
    ap.add_argument("--work", default=str(ROOT / "bench/results/teacher_scale"))
    ap.add_argument("--out", default=None, help="JSON results (default: WORK/EXPERIMENT.json)")
    a = ap.parse_args(argv)
    work = Path(a.work) / a.experiment
    work.mkdir(parents=True, exist_ok=True)
    rows = (big_teacher(work, a.nproc) if a.experiment == "big-teacher"
            else vocab(work, [int(c) for c in a.chunks.split(",")]))
    for r in rows:
        what = r.get("placement") or (f"vocab {r['vocab']} ({r['shard_dtype']} shards), "
                                      f"kd_chunk_size {r['kd_chunk_size']}")
        print(f"{what}: peak RSS per rank {[round(x) for x in r['peak_rss_mib_per_rank']]} MiB | rank 0 after "
              f"loading: peak {r['rank0_after_loading_mib']:.0f} MiB, anonymous now "
              f"{r['rank0_anon_after_loading_mib']:.0f} MiB; after steps {r['rank0_after_steps_mib']:.0f} MiB | "
              f"step {r['step_s']:.2f} s")
        if r.get("placement_line"):
            print(f"    {r['placement_line']}")
    out = Path(a.out or work / f"{a.experiment}.json")
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
