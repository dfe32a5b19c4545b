"""What does SHD cost per training step? CE+KD vs CE+KD+SHD vs CE+KD+dense attention distillation.

    python bench/step_cost.py                                 # pairs tiny,mid; T = 256, 1024, 2048
    python bench/step_cost.py --pairs tiny --seq-lens 256,1024 --steps 3
    python bench/step_cost.py --out bench/results/step_cost.json

One process, one configuration per fresh process (peak memory on CPU is the process's peak RSS,
which cannot be reset), batch of --batch sequences of T tokens, fp32, student with non-reentrant
activation checkpointing in every variant. Step = teacher forward (no grad) + student forward +
loss + backward + AdamW step; the median over --steps timed steps after --warmup untimed ones,
as wall time and as the process's CPU time. With --threads 1 the CPU time is the work done and
hardly moves when other jobs share the machine, unlike the wall time.

Variants:
- ``kd``: 0.5 CE + 0.5 tau^2 KL (tau 2), the engine's ``DistillObjective`` (chunked CE/KD).
- ``shd``: the same + SHD (plan pairwise, objective output) exactly as the engine computes it: the
  engine's ``shd_teacher``/``shd_student`` attention functions and ``ShdCapture`` (mixing weights
  from q, k, v and W_O in the teacher's o_proj pre-hook; streaming ``shd_loss`` inside the
  student's attention, computed once per step under checkpointing, no T x T map kept).
- ``select``: the same with plan ``select`` (the engine's default: one teacher head per student head).
- ``dense``: the same CE/KD + attention distillation the way other projects do it: teacher and
  student run *eager* attention with ``output_attentions=True``, the teacher's [B, M, T, T] maps
  are merged with the same pairwise weights (computed from those maps and the values), and the
  loss is KL(target || student map) on the full [B, N, T, T] student maps (kept for backward).

The engine has no dense variant, so all three run here on plain transformers models (no
DeepSpeed, no process group): the same code for each, so the comparison is like for like. The
engine's own per-step overhead (ZeRO-3 gathers, all-reduces) is not included; see docs/engine.md
for in-engine step times at the demo's size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS = {
    # the demo's pair (configs/demo_teacher.yaml -> configs/demo_student.yaml), 8 -> 3 heads
    "tiny": dict(vocab=4096, teacher=dict(layers=4, hidden=128, heads=8, kv=2, ffn=384),
                 student=dict(layers=2, hidden=96, heads=3, kv=3, ffn=256)),
    # a mid-size pair, 16 -> 4 heads (~30M teacher, ~8M student with vocabulary 8000)
    "mid": dict(vocab=8000, teacher=dict(layers=8, hidden=512, heads=16, kv=4, ffn=1408),
                student=dict(layers=4, hidden=256, heads=4, kv=4, ffn=704)),
    # LLaMA-7B/8B attention shape (32 heads, 8 kv heads, head dim 64 x 2 = 128 in the real model;
    # 64 here) on a narrow residual stream so that long sequences fit a CPU; 8-head student
    "wide": dict(vocab=8000, teacher=dict(layers=2, hidden=256, heads=32, kv=8, head_dim=64, ffn=512),
                 student=dict(layers=2, hidden=256, heads=8, kv=8, head_dim=32, ffn=512)),
}
VARIANTS = ("kd", "shd", "select", "dense")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _llama(spec: dict, vocab: int, max_pos: int, attn: str, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=spec["hidden"], intermediate_size=spec["ffn"],
                      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      num_key_value_heads=spec["kv"], head_dim=spec.get("head_dim"),
                      max_position_embeddings=max_pos, use_cache=False)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).float()


def run_one(pair: str, seq_len: int, variant: str, batch: int, steps: int, warmup: int,
            device: str = "cpu") -> dict:
    """One configuration in this process; returns its measurements."""
    import torch

    from pipeline.config import config_from_dict
    from pipeline.data.reader import Batch
    from pipeline.loss import capture as attn
    from pipeline.loss.ce_kd import ce_kd_sums_reference
    from pipeline.loss.objective import DistillObjective, StepTotals
    from pipeline.shd.plan import layer_map
    from pipeline.shd.reference import weights_from_maps

    p = PAIRS[pair]
    ts, ss, vocab = p["teacher"], p["student"], p["vocab"]
    plan = "select" if variant == "select" else "pairwise"
    captured = variant in ("shd", "select")
    pairs = dict(enumerate(layer_map(ss["layers"], ts["layers"])))
    cfg = config_from_dict({
        "stage": "distill", "teacher": {"path": "unused"}, "data": {"dir": "unused", "seq_len": seq_len},
        "student": {"num_layers": ss["layers"], "num_heads": ss["heads"], "hidden_size": ss["hidden"],
                    "max_position_embeddings": max(seq_len, 2048)},
        "distill": {"w_ce": 0.5, "w_kd": 0.5, "tau_kd": 2.0, "w_shd": 0.0 if variant == "kd" else 1.0,
                    "plan": plan, "objective": "output", "kd_chunk_size": 512, "shd_block_size": 128},
    }, [])
    # the run's distill section: plan, objective output, tau_shd 1, block 128 (registers the attention functions)
    capture = attn.ShdCapture.from_config(cfg.distill, pairs, ss["heads"]) if captured else None
    t_attn, s_attn = {"kd": ("sdpa", "sdpa"), "dense": ("eager", "eager")}.get(
        variant, (attn.TEACHER_ATTN, attn.STUDENT_ATTN))
    teacher = _llama(ts, vocab, seq_len, t_attn, 0).to(device).eval().requires_grad_(False)
    student = _llama(ss, vocab, seq_len, s_attn, 1).to(device).train()
    # the engine's activation checkpointing (pipeline/training/builders.py): per layer, non-reentrant
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    if capture is not None:
        capture.attach(student, teacher)
    objective = DistillObjective(cfg, vocab, capture)
    values: dict[int, torch.Tensor] = {}
    if variant == "dense":  # the teacher's values of distilled layers, for the mixing weights
        mods = attn.attention_modules(teacher)
        for t in set(pairs.values()):
            def keep(mod, args, out, t=t):
                b, n, _ = out.shape
                values[t] = out.view(b, n, ts["kv"], -1).transpose(1, 2)
            mods[t].v_proj.register_forward_hook(keep)

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab, (batch, seq_len + 1), generator=g).to(device)
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    valid = torch.ones_like(labels, dtype=torch.bool)
    n_tok = float(valid.sum())
    batch_, totals = Batch(inp, labels, valid, mask=None), StepTotals(tokens=n_tok, rows=float(inp.numel()))

    def dense_step():
        with torch.no_grad():
            tout = teacher(input_ids=inp, use_cache=False, output_attentions=True)
        sout = student(input_ids=inp, use_cache=False, output_attentions=True)
        ce_sum, kl_sum = ce_kd_sums_reference(sout.logits, labels, valid, tout.logits, tau=2.0, vocab=vocab)
        loss = 0.5 * ce_sum / n_tok + 0.5 * 4.0 * kl_sum / n_tok
        attn_losses = []
        for s, t in pairs.items():
            maps = tout.attentions[t]  # [B, M, T, T]
            o_w = attn.attention_modules(teacher)[t].o_proj.weight
            with torch.no_grad():
                w = weights_from_maps(maps, values[t], o_w, ss["heads"], plan="pairwise", objective="output")
                target = torch.einsum("bnm,bmij->bnij", w, maps)
            smap = sout.attentions[s]  # [B, N, T, T], part of the graph
            kl = (target * (target.clamp_min(1e-12).log() - smap.clamp_min(1e-12).log())).sum(-1)
            attn_losses.append(kl.mean())
        loss = loss + torch.stack(attn_losses).mean()
        del tout
        return loss

    def step():
        opt.zero_grad(set_to_none=True)
        if variant == "dense":
            loss = dense_step()
            loss.backward()
        else:
            with objective.micro_batch(student, teacher, batch_, totals) as (loss, _):
                loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return loss.detach().item()

    base = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else _rss_mib()
    for _ in range(warmup):
        step()
    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = _peak_mib(device)
    return {"pair": pair, "seq_len": seq_len, "variant": variant, "batch": batch, "steps": steps,
            "step_s": statistics.median(times), "step_s_all": times, "cpu_s": statistics.median(cpu_times),
            "cpu_s_all": cpu_times, "peak_mib": peak,
            "base_mib": base, "step_mem_mib": peak - base, "loss": loss, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="tiny,mid", help=f"comma list from {','.join(PAIRS)}")
    ap.add_argument("--seq-lens", default="256,1024,2048")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (peak memory: the CUDA allocator's)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/step_cost.json"))
    ap.add_argument("--one", nargs=3, metavar=("PAIR", "T", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        pair, t, variant = args.one
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_one(pair, int(t), variant, args.batch, args.steps, args.warmup,
                                                  args.device)), flush=True)
        return 0

    rows = []
    for pair in args.pairs.split(","):
        for t in [int(x) for x in args.seq_lens.split(",")]:
            for variant in args.variants.split(","):
                cmd = [sys.executable, __file__, "--one", pair, str(t), variant, "--batch", str(args.batch),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                       "--device", args.device]
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
                    res = [json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
                    row = res[0] if res else {"pair": pair, "seq_len": t, "variant": variant,
                                              "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
                except subprocess.TimeoutExpired:
                    row = {"pair": pair, "seq_len": t, "variant": variant, "error": f"timeout {args.timeout} s"}
                rows.append(row)
                msg = (f"{row['step_s'] * 1000:9.0f} ms  peak {row['peak_mib']:7.0f} MiB  step mem "
                       f"{row['step_mem_mib']:7.0f} MiB") if "error" not in row else row["error"]
                print(f"{pair:5s} T={t:5d} {variant:6s} {msg}", flush=True)
    table = report(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "threads": args.threads, "batch": args.batch, "pairs": PAIRS,
                               "rows": rows, "note": "plain transformers models, one process, no DeepSpeed; fp32"},
                              indent=1))
    print(f"wrote {out}")
    return 0


def report(rows: list[dict]) -> str:
    """Markdown table with each variant's ratio to CE+KD of the same pair and T."""
    kd = {(r["pair"], r["seq_len"]): r for r in rows if r["variant"] == "kd" and "error" not in r}
    lines = ["| pair | T | variant | step (ms) | x CE+KD | CPU time (ms) | x CE+KD | peak mem (MiB) | x CE+KD "
             "| step mem (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['pair']} | {r['seq_len']} | {r['variant']} | {r['error']} | | | | | | |")
            continue
        base = kd.get((r["pair"], r["seq_len"]))

        def ratio(key: str, r: dict = r, base: dict | None = base) -> str:
            return f"{r[key] / base[key]:.2f}" if base else "-"

        lines.append(f"| {r['pair']} | {r['seq_len']} | {r['variant']} | {r['step_s'] * 1000:.0f} | {ratio('step_s')} "
                     f"| {r['cpu_s'] * 1000:.0f} | {ratio('cpu_s')} | {r['peak_mib']:.0f} | {ratio('peak_mib')} "
                     f"| {r['step_mem_mib']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
