"""The lines `python -m pipeline.prune` prints: what was kept on each axis, with the scores that chose
it, so a pruning can be judged (and compared with another) from its log alone."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .choice import PruneChoice
from .importance import Importance


def _share(scores: Tensor, kept: Sequence[int]) -> str:
    total = float(scores.sum())
    return f"{100.0 * float(scores[list(kept)].sum()) / total:.1f}%" if total > 0 else "n/a"


def summary_lines(importance: Importance, choice: PruneChoice) -> list[str]:
    """Layers (every teacher layer's block influence, kept ones starred), per kept layer its kv and
    query heads with their importance and its share of neuron importance kept, and the channels."""
    kept_layers = {layer.teacher_layer for layer in choice.layers}
    lines = [f"calibration: {importance.tokens} tokens",
             f"layers: {len(choice.layers)} of {len(importance.layers)} kept by block influence "
             f"(teacher layer: score, * kept)",
             "  " + "  ".join(f"{t}{'*' if t in kept_layers else ''}:{s:.4f}"
                              for t, s in enumerate(importance.layers.tolist()))]
    groups = importance.kv_groups(importance.heads.shape[1] // choice.teacher_heads_per_kv)
    for j, layer in enumerate(choice.layers):
        t = layer.teacher_layer
        kv = ", ".join(f"{k}:{float(groups[t, k]):.3f}" for k in layer.kv_heads)
        heads = ", ".join(f"{h}:{float(importance.heads[t, h]):.3f}" for h in layer.q_heads)
        dropped = [h for h in range(importance.heads.shape[1]) if h not in layer.q_heads]
        lines.append(f"student layer {j} <- teacher layer {t}: kv heads [{kv}], query heads [{heads}]"
                     + (f", dropped [{', '.join(f'{h}:{float(importance.heads[t, h]):.3f}' for h in dropped)}]"
                        if dropped else ""))
        lines.append(f"  MLP: {len(layer.neurons)} of {importance.neurons.shape[1]} neurons, "
                     f"{_share(importance.neurons[t], layer.neurons)} of the layer's neuron importance")
    lines.append(f"hidden: {len(choice.channels)} of {len(importance.channels)} channels, "
                 f"{_share(importance.channels, choice.channels)} of channel importance")
    return lines
