"""Time and peak memory of the SHD loss: dense oracle vs streaming, one layer.

    python bench/shd_loss.py                       # T in 512..4096, M=16 -> N=4 heads, d=64
    python bench/shd_loss.py --lengths 512 1024 --out bench/results/shd_loss.json

Each (implementation, T) runs in a fresh subprocess so that its peak is its own: peak extra
memory is the process's peak resident set (or the CUDA allocator's peak on a GPU) minus what it
held once the inputs existed. Time is the median of `--repeats` forward+backward passes after one
warm-up. Targets (issue 2): at T = 2048 the streaming peak is <= 1/8 of the dense one, it grows
about linearly in T (2048 -> 4096 at most ~2.2x), and streaming time is <= 1.5x dense.
The squeeze weights (streaming) are timed and measured the same way in their own column, given
the teacher's attention output per head as the engine does (it reads it from o_proj's input).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(impl: str, length: int, teacher_heads: int, teacher_kv_heads: int, student_heads: int, head_dim: int,
            block: int, repeats: int, device: str) -> dict:
    """Runs in the child process: one implementation at one length."""
    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.shd import shd_loss, shd_loss_reference, squeeze_weights

    gen = torch.Generator().manual_seed(0)
    shape_t = (1, teacher_heads, length, head_dim)
    shape_kv = (1, teacher_kv_heads, length, head_dim)
    shape_s = (1, student_heads, length, head_dim)
    tq = torch.randn(shape_t, generator=gen).to(device)
    tk, tv = (torch.randn(shape_kv, generator=gen).to(device) for _ in range(2))
    o_proj = (torch.randn(teacher_heads * head_dim, teacher_heads * head_dim, generator=gen) * 0.05).to(device)
    sq = torch.randn(shape_s, generator=gen).to(device).requires_grad_(True)
    sk = torch.randn(shape_s, generator=gen).to(device).requires_grad_(True)
    # weights from a short prefix: any valid mixing matrix serves the loss, and a small call here
    # keeps the process's lifetime peak (ru_maxrss) below what the measured step will reach
    weights = squeeze_weights(tq[:, :, :64], tk[:, :, :64], tv[:, :, :64], o_proj, student_heads)

    if impl == "weights":
        # the teacher's own attention output per head, which the engine reads from o_proj's input
        per_kv = teacher_heads // teacher_kv_heads
        head_outputs = torch.nn.functional.scaled_dot_product_attention(
            tq, tk.repeat_interleave(per_kv, 1), tv.repeat_interleave(per_kv, 1), is_causal=True)

        def step():
            squeeze_weights(tq, tk, tv, o_proj, student_heads, head_outputs=head_outputs)
    else:
        loss_fn = shd_loss if impl == "streaming" else shd_loss_reference

        def step():
            loss = loss_fn(sq, sk, tq, tk, weights, block_size=block)
            loss.backward()
            sq.grad = sk.grad = None

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"impl": impl, "T": length, "seconds": statistics.median(times), "peak_extra_bytes": max(peak, 0)}


def run_child(args: argparse.Namespace, impl: str, length: int) -> dict | None:
    cmd = [
        sys.executable, __file__, "--child", impl, "--lengths", str(length), "--teacher-heads", str(args.teacher_heads),
        "--teacher-kv-heads", str(args.teacher_kv_heads or args.teacher_heads),
        "--student-heads", str(args.student_heads), "--head-dim", str(args.head_dim), "--block", str(args.block),
        "--repeats", str(args.repeats), "--device", args.device,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"  {impl} T={length} timed out after {args.timeout} s", file=sys.stderr)
        return None
    if proc.returncode != 0:
        print(f"  {impl} T={length} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--teacher-heads", type=int, default=16)
    parser.add_argument("--teacher-kv-heads", type=int, help="grouped-query key/value heads (default: no GQA, "
                                                           "the costlier case for the weights)")
    parser.add_argument("--student-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=128, help="query rows per block of the streaming loss")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-max-length", type=int, default=4096, help="skip the dense oracle above this T")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (peak memory: the CUDA allocator's)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per measurement process (default: none)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shd_loss.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure(args.child, args.lengths[0], args.teacher_heads,
                                 args.teacher_kv_heads or args.teacher_heads, args.student_heads, args.head_dim,
                                 args.block, args.repeats, args.device)))
        return

    rows = []
    print(f"SHD loss, one layer, B=1, M={args.teacher_heads} -> N={args.student_heads} heads, d={args.head_dim}, "
          f"block={args.block}, device={args.device}")
    header = (f"{'T':>6} | {'dense s':>8} {'dense MiB':>10} | {'stream s':>8} {'stream MiB':>10} | "
              f"{'time x':>6} {'mem /':>6} | {'weights s':>9} {'weights MiB':>11}")
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        dense = run_child(args, "dense", length) if length <= args.dense_max_length else None
        stream = run_child(args, "streaming", length)
        weights = run_child(args, "weights", length)
        row = {"T": length, "dense": dense, "streaming": stream, "weights": weights}
        rows.append(row)

        def fmt(r, key, scale=1.0, width=8, digits=3):
            return f"{r[key] / scale:>{width}.{digits}f}" if r else f"{'-':>{width}}"

        ratio_t = f"{stream['seconds'] / dense['seconds']:>6.2f}" if dense and stream else f"{'-':>6}"
        ratio_m = (f"{dense['peak_extra_bytes'] / max(stream['peak_extra_bytes'], 1):>6.1f}" if dense and stream
                   else f"{'-':>6}")
        mib = 2**20
        print(f"{length:>6} | {fmt(dense, 'seconds')} {fmt(dense, 'peak_extra_bytes', mib, 10, 1)} | "
              f"{fmt(stream, 'seconds')} {fmt(stream, 'peak_extra_bytes', mib, 10, 1)} | {ratio_t} {ratio_m} | "
              f"{fmt(weights, 'seconds', 1.0, 9)} {fmt(weights, 'peak_extra_bytes', mib, 11, 1)}", flush=True)
        # rewritten after every length: a caller that stops this run early keeps the rows so far
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k != "out" and k != "child"}
        args.out.write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
