"""The student's weights as slices of the teacher's, and the student model built from them.

Per kept layer (renumbered 0..L-1 in the teacher's order), with c the kept hidden channels, q / kv
the rows of the kept query / kv heads (head_dim each) and n the kept neurons:

    q_proj [q, c] (+ bias [q])      k_proj, v_proj [kv, c] (+ bias [kv])     o_proj [c, q] (+ bias [c])
    gate_proj, up_proj [n, c] (+ bias [n])     down_proj [c, n] (+ bias [c])
    input_layernorm, post_attention_layernorm [c]     q_norm, k_norm (per head_dim) unchanged

and embed_tokens [:, c], the final norm [c], lm_head [:, c] (tied embeddings stay tied: the head is
not stored, `tie_weights` shares the sliced embedding). Any parameter not named here is refused
rather than copied: a weight this code does not understand would make a silently wrong student.
Nothing pruned gives the teacher's tensors exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.config import ConfigError
from pipeline.models.loading import load_weights

from .choice import LayerChoice, PruneChoice

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _rows(heads: Sequence[int], head_dim: int) -> Tensor:
    """The output rows (or input columns) of `heads` in a projection of heads x head_dim."""
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def _take(t: Tensor, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
    """A new contiguous tensor of `t`'s selected rows and columns (None: all)."""
    if rows is not None:
        t = t.index_select(0, rows.to(t.device))
    if cols is not None:
        t = t.index_select(1, cols.to(t.device))
    return t.detach().clone().contiguous()


def _layer_tensor(name: str, t: Tensor, layer: LayerChoice, c: Tensor, head_dim: int) -> Tensor:
    """Slice one parameter of a kept decoder layer (`name` relative to the layer)."""
    q, kv = _rows(layer.q_heads, head_dim), _rows(layer.kv_heads, head_dim)
    n = torch.tensor(layer.neurons, dtype=torch.long)
    module, _, kind = name.rpartition(".")
    rules = {
        "self_attn.q_proj": (q, c), "self_attn.k_proj": (kv, c), "self_attn.v_proj": (kv, c),
        "self_attn.o_proj": (c, q), "mlp.gate_proj": (n, c), "mlp.up_proj": (n, c), "mlp.down_proj": (c, n),
        "input_layernorm": (c, None), "post_attention_layernorm": (c, None),
        "self_attn.q_norm": (None, None), "self_attn.k_norm": (None, None),
    }
    if module not in rules or kind not in ("weight", "bias"):
        raise ConfigError(f"the teacher's parameter {name!r} of layer {layer.teacher_layer} is not one pruning "
                          f"knows how to slice: this teacher's layout is not LLaMA's")
    rows, cols = rules[module]
    return _take(t, rows, cols if kind == "weight" else None)


def student_state_dict(teacher_state: Mapping[str, Tensor], choice: PruneChoice, head_dim: int,
                       tied: bool) -> dict[str, Tensor]:
    """The student's parameters sliced from `teacher_state` (a LLaMA-layout state dict)."""
    c = torch.tensor(choice.channels, dtype=torch.long)
    kept = {layer.teacher_layer: (j, layer) for j, layer in enumerate(choice.layers)}
    out: dict[str, Tensor] = {}
    for name, t in teacher_state.items():
        match = _LAYER.fullmatch(name)
        if match:
            if int(match[1]) in kept:
                j, layer = kept[int(match[1])]
                out[f"model.layers.{j}.{match[2]}"] = _layer_tensor(match[2], t, layer, c, head_dim)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            if not (tied and name == "lm_head.weight"):
                out[name] = _take(t, None, c)
        elif name == "model.norm.weight":
            out[name] = _take(t, c)
        elif name == "lm_head.bias":
            out[name] = _take(t)
        else:
            raise ConfigError(f"the teacher's parameter {name!r} is not one pruning knows how to slice: this "
                              f"teacher's layout is not LLaMA's")
    return out


def build_student(student_cfg: PretrainedConfig, state: Mapping[str, Tensor], dtype: torch.dtype) -> PreTrainedModel:
    """The student model (the teacher's class, from `student_cfg`) holding `state` cast to `dtype`.

    Built on the meta device and given the tensors themselves, so no random initialisation runs and
    no second copy of the weights is made; a key missing or left over is an error."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(student_cfg, dtype=dtype)
    weights = {k: v.to(dtype) for k, v in state.items()}
    misfit = load_weights(model, weights, assign=True)
    if misfit:
        raise RuntimeError(f"sliced weights do not fit the student's config: {misfit}")
    rotary = model.model.rotary_emb  # non-persistent buffers (inv_freq): computed, not loaded
    model.model.rotary_emb = type(rotary)(config=student_cfg)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"the student's tensors {left} were neither sliced from the teacher nor computed")
    return model.eval()
