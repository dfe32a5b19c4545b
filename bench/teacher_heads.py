"""What a teacher's attention heads do, layer by layer: the evidence behind a choice of distilled heads.

    python bench/teacher_heads.py --teacher DIR --data SHARDS [--layers 4,9,14] [--seq-len 256] [--samples 8]

For each head of the given teacher layers (default: every layer), over the first --samples
sequences of the data's val split, with the model's own eager attention maps: the mean attention
on the first position of the sequence (an attention sink puts most of its mass there), on the
previous token, the mean row entropy (nats) and the mean distance attended to. Printed as a
Markdown table per layer, with the heads that distill.select_heads=first would distil marked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def head_statistics(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """[B, H, T, T] causal maps -> per head [H]: sink mass, previous-token mass, entropy, distance."""
    T = maps.shape[-1]
    rows = torch.arange(1, T)  # query rows that can attend to more than themselves
    pos = torch.arange(T, dtype=maps.dtype)
    distance = ((pos[:, None] - pos[None, :]).clamp_min(0) * maps).sum(-1)
    entropy = -(torch.xlogy(maps, maps)).sum(-1)
    return {"sink": maps[..., rows, 0].mean((0, 2)), "previous": maps[..., rows, rows - 1].mean((0, 2)),
            "entropy": entropy[..., rows].mean((0, 2)), "distance": distance[..., rows].mean((0, 2))}


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    from pipeline.data.reader import PackedSampleReader

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--layers", default=None, help="comma list of teacher layers (default all)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--student-heads", type=int, default=3, help="for the heads `first` would distil")
    args = ap.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = PackedSampleReader(args.data, split="val", seq_len=args.seq_len).eval_batches(args.samples)
    inputs = next(iter(tokens))[:, :-1]
    with torch.no_grad():
        maps = model(input_ids=inputs, output_attentions=True).attentions
    layers = [int(x) for x in args.layers.split(",")] if args.layers else range(len(maps))
    heads = maps[0].shape[1]
    group = heads // args.student_heads
    for layer in layers:
        stats = head_statistics(maps[layer].double())
        print(f"\nlayer {layer}\n\n| head | first-of-group | sink mass | previous-token mass | entropy | distance |")
        print("|---|---|---|---|---|---|")
        for h in range(heads):
            mark = "yes" if h % group == 0 and h // group < args.student_heads else ""
            print(f"| {h} | {mark} | {stats['sink'][h]:.3f} | {stats['previous'][h]:.3f} | "
                  f"{stats['entropy'][h]:.2f} | {stats['distance'][h]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
