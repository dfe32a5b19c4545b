"""The pruned student's shape: resolved from the command line and checked against the teacher's
config before any weight loads, so a bad option costs no calibration; and the student's HF config.

Every axis left out keeps the teacher's size. head_dim is never pruned: a kept head keeps all of
its dimensions (its rotary embedding and scaling stay the teacher's), so the student's attention
width heads * head_dim need not equal its hidden size. The config records head_dim explicitly for
that reason (Qwen2 would otherwise derive hidden_size // heads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from pipeline.config import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

PRUNABLE: dict[str, str] = {
    "llama": "LLaMA (GQA, tied or untied embeddings, any rope_scaling)",
    "mistral": "LLaMA's layout with a sliding window",
    "qwen2": "LLaMA's layout with q/k/v biases and per-layer sliding windows (layer_types)",
    "qwen3": "LLaMA's layout with per-head q/k RMS norms (over head_dim, which pruning keeps)",
}
"""model_type -> why slicing LLaMA's parameters (q/k/v/o, gate/up/down, RMS norms) is exact for it."""

FLAGS: dict[str, str] = {"layers": "--layers", "heads": "--heads", "kv_heads": "--kv-heads",
                         "intermediate_size": "--intermediate-size", "hidden_size": "--hidden-size"}
"""StudentShape field -> the command-line flag that sets it (named in every refusal)."""


@dataclass(frozen=True)
class StudentShape:
    """Sizes of the student on every prunable axis (head_dim is the teacher's)."""

    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int
    hidden_size: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def head_dim(hf_config: PretrainedConfig) -> int:
    """The teacher's per-head dimension (explicit in the config, or hidden_size // heads)."""
    return int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)


def teacher_shape(hf_config: PretrainedConfig) -> StudentShape:
    """The teacher's own sizes: the student when nothing is pruned."""
    return StudentShape(layers=hf_config.num_hidden_layers, heads=hf_config.num_attention_heads,
                        kv_heads=hf_config.num_key_value_heads, intermediate_size=hf_config.intermediate_size,
                        hidden_size=hf_config.hidden_size)


def check_family(hf_config: PretrainedConfig, teacher_dir: str) -> None:
    """Refuse a teacher whose parameters this package cannot slice exactly (e.g. a mixture of experts)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in PRUNABLE:
        raise ConfigError(f"--teacher {teacher_dir} is a {model_type!r} model; pruning slices the LLaMA layout "
                          f"of {', '.join(sorted(PRUNABLE))} only: choose a teacher of one of those families")


def resolve_shape(hf_config: PretrainedConfig, requested: Mapping[str, int | None]) -> StudentShape:
    """The student's shape: each `requested` size (None = the teacher's), checked on its own and for
    grouped-query attention; raises ConfigError naming the flag and the fix."""
    teacher = teacher_shape(hf_config)
    sizes = teacher.as_dict()
    units = {"layers": "layers", "heads": "query heads", "kv_heads": "kv heads",
             "intermediate_size": "MLP neurons per layer", "hidden_size": "hidden channels"}
    for field, value in requested.items():
        if value is None:
            continue
        if not 1 <= value <= sizes[field]:
            raise ConfigError(f"{FLAGS[field]} {value}: the teacher has {sizes[field]} {units[field]} and pruning "
                              f"only removes: choose {FLAGS[field]} between 1 and {sizes[field]} (leave it out to "
                              f"keep all {sizes[field]})")
        sizes[field] = value
    shape = StudentShape(**sizes)
    _check_groups(shape, teacher, requested)
    return shape


def _check_groups(shape: StudentShape, teacher: StudentShape, requested: Mapping[str, int | None]) -> None:
    """Every student kv head serves heads // kv_heads query heads, all kept from that kv head's
    teacher group, so heads // kv_heads cannot exceed a teacher group's size."""
    kv_note = "" if requested.get("kv_heads") is not None else " (the teacher's: --kv-heads was left out)"
    heads_note = "" if requested.get("heads") is not None else " (the teacher's: --heads was left out)"
    if shape.heads % shape.kv_heads:
        divisors = [k for k in range(1, min(shape.heads, teacher.kv_heads) + 1) if shape.heads % k == 0]
        raise ConfigError(f"--heads {shape.heads}{heads_note} is not a multiple of --kv-heads {shape.kv_heads}"
                          f"{kv_note}: every kv head serves the same number of query heads; choose --heads a "
                          f"multiple of {shape.kv_heads}, or --kv-heads one of {divisors}")
    group = teacher.heads // teacher.kv_heads
    per_kv = shape.heads // shape.kv_heads
    if per_kv > group:
        raise ConfigError(f"--heads {shape.heads}{heads_note} with --kv-heads {shape.kv_heads}{kv_note} gives "
                          f"{per_kv} query heads per kv head, but each teacher kv head serves only {group} "
                          f"({teacher.heads} heads / {teacher.kv_heads} kv heads) and a kept query head keeps "
                          f"its own kv head: choose --heads at most {group * shape.kv_heads}, or more --kv-heads "
                          f"(at least {-(-shape.heads // group)})")


def student_config(teacher_config: PretrainedConfig, shape: StudentShape,
                   teacher_layers: Sequence[int]) -> PretrainedConfig:
    """The student's HF config: the teacher's (same class, rope and every other setting) with the
    pruned sizes, head_dim made explicit and the per-layer fields of the kept `teacher_layers`.

    Raises ConfigError naming the flags when transformers refuses the shape (LLaMA's config wants
    hidden_size to be a multiple of num_attention_heads, even with an explicit head_dim)."""
    body = teacher_config.to_dict()
    body.update(num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate_size,
                hidden_size=shape.hidden_size, head_dim=head_dim(teacher_config))
    if body.get("layer_types") is not None:
        body["layer_types"] = [body["layer_types"][t] for t in teacher_layers]
    window_from = body.get("max_window_layers")  # Qwen: the first layer that may use the sliding window
    if window_from is not None and window_from < teacher_config.num_hidden_layers:
        body["max_window_layers"] = sum(1 for t in teacher_layers if t < window_from)
    try:
        return type(teacher_config).from_dict(body)
    except Exception as exc:  # noqa: BLE001 -- validators raise ValueError, or huggingface_hub's StrictDataclassError
        hint = ""
        if shape.hidden_size % shape.heads:
            lower = shape.hidden_size // shape.heads * shape.heads
            near = [h for h in (lower, lower + shape.heads) if 1 <= h <= teacher_config.hidden_size]
            hint = (f"; transformers' {type(teacher_config).__name__} wants --hidden-size a multiple of --heads "
                    f"{shape.heads}" + (f" (e.g. {' or '.join(map(str, near))})" if near else ""))
        raise ConfigError(f"--hidden-size {shape.hidden_size} with --heads {shape.heads}: transformers refuses the "
                          f"student's config ({str(exc).strip().splitlines()[-1].strip()}){hint}") from exc
