"""Which Hugging Face model families SHD distils correctly, and a clear refusal of all others.

SHD recomputes a layer's attention maps from the queries and keys that the layer passes to its
attention function (after rotary embedding, biases and q/k norms): softmax(q k^T * scaling),
causal, padding-masked and, where the layer has one, sliding-window-masked; `scaling` and
`sliding_window` are read from the same call (`pipeline.loss.capture.map_spec`). A family is
supported when that is exactly the map its attention computes, which tests/test_teachers.py
checks for each entry of `SUPPORTED` against the model's own eager attention
(`output_attentions=True`) on a tiny random model of the family.

Anything else is refused from the Hugging Face config alone, before any weights load, because
targets from a wrong map would train without complaint: a known family whose attention differs
(`REFUSED`: soft-capping, sinks, chunked attention, fused projections), any config with such a
feature, and any model type not in the table. To add a family: add its model_type to `SUPPORTED`
with a line on how its attention differs from LLaMA's, add a tiny config of it to
tests/test_teachers.py (`FAMILIES`), and the table entry is earned when that file passes.

Without SHD only the logits are used, so any causal LM works as a teacher; the attention
implementation it then runs with is `plain_attn_implementation` (eager where the family's SDPA
path refuses its attention, e.g. Gemma 2's soft-capping).
"""

from __future__ import annotations

from pipeline.config import ConfigError

SUPPORTED: dict[str, str] = {
    "llama": "the reference (rope_scaling of any type, attention_bias and head_dim act before attention)",
    "mistral": "sliding_window for every layer, passed to the attention function",
    "mixtral": "Mistral's attention (sliding_window) with a mixture-of-experts MLP",
    "qwen2": "q/k/v biases; sliding windows per layer (use_sliding_window, max_window_layers, layer_types)",
    "qwen3": "per-head q/k RMS norms before rotary embedding; per-layer sliding windows as Qwen2",
    "granite": "scaling = attention_multiplier instead of 1/sqrt(head_dim)",
}
"""model_type -> how its attention differs from LLaMA's (every entry is checked by tests/test_teachers.py)."""

REFUSED: dict[str, str] = {
    "gemma2": "attention logit soft-capping (attn_logit_softcapping) with query_pre_attn_scalar scaling",
    "gpt_oss": "attention sinks (learned per-head logits added to every softmax)",
    "llama4": "chunked attention (attention_chunk_size) and per-layer NoPE/temperature tuning",
    "phi3": "a fused qkv_proj instead of separate q/k/v projections",
    "phi": "no o_proj (the output projection is `dense`) and partial rotary embedding",
    "gpt2": "a fused c_attn projection and no q/k/v/o modules",
}
"""model_type -> the attention feature SHD's maps do not reproduce (named in the refusal)."""

# Config fields that change the attention map in any family that has them: (field, feature name).
_MAP_CHANGING_FIELDS = (
    ("attn_logit_softcapping", "attention logit soft-capping"),
    ("attention_chunk_size", "chunked attention"),
)

_FIX = "set distill.w_shd=0 (logit KD still works) or use another {role}"


def _refuse(role: str, hf_config, feature: str) -> ConfigError:
    return ConfigError(f"the {role} ({hf_config.model_type}) uses {feature}, which SHD's attention maps do not "
                       f"reproduce: {_FIX.format(role=role)} (supported: {', '.join(sorted(SUPPORTED))})")


def check_distillable(role: str, hf_config) -> None:
    """Refuse, from the config alone, a `role` ("teacher" or "student") whose attention maps SHD
    cannot reproduce; call only when SHD is on (distill.w_shd > 0)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type in REFUSED:
        raise _refuse(role, hf_config, REFUSED[model_type])
    for field, feature in _MAP_CHANGING_FIELDS:
        value = getattr(hf_config, field, None)
        if value is not None:
            raise _refuse(role, hf_config, f"{feature} ({field}={value})")
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"the {role}'s model_type {model_type!r} is not in SHD's table of supported architectures "
            f"({', '.join(sorted(SUPPORTED))}), so its attention maps are not known to be reproduced: "
            f"{_FIX.format(role=role)}; to add the family, list it in SUPPORTED in pipeline/models/architectures.py "
            "and in FAMILIES in tests/test_teachers.py, and make that test pass")


def layer_window(hf_config, layer: int) -> int | None:
    """The sliding window of one layer from the config (None = full causal attention).

    Follows transformers: a family with `layer_types` windows only its "sliding_attention"
    layers; otherwise `sliding_window` (None when unset, or Qwen's use_sliding_window=false)
    applies to every layer.
    """
    window = getattr(hf_config, "sliding_window", None)
    types = getattr(hf_config, "layer_types", None)
    if window is None or (types is not None and types[layer] != "sliding_attention"):
        return None
    return int(window)


def check_windows(student_cfg, teacher_cfg, pairs: dict[int, int], seq_len: int) -> None:
    """Refuse a distilled student layer whose sliding window is narrower than its teacher layer's
    at data.seq_len: the teacher's map would put probability where the student cannot attend."""

    def effective(window: int | None) -> int | None:
        return window if window is not None and window < seq_len else None

    for s, t in sorted(pairs.items()):
        sw, tw = effective(layer_window(student_cfg, s)), effective(layer_window(teacher_cfg, t))
        if sw is not None and (tw is None or tw > sw):
            raise ConfigError(
                f"student layer {s} has a sliding window of {sw} tokens but its teacher layer {t} has "
                f"{tw or 'none'} at data.seq_len={seq_len}: the teacher's maps reach keys the student cannot see; "
                "use a student without a sliding window (or one at least as wide), or set distill.w_shd=0")


def plain_attn_implementation(hf_config) -> str:
    """The attention a model runs with when SHD is off: "sdpa", or "eager" for a family whose SDPA
    path transformers refuses (Gemma 2: soft-capping), so logit KD from it works."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(hf_config), None)
    supports_sdpa = getattr(model_class, "_supports_sdpa", True)
    softcapped = getattr(hf_config, "attn_logit_softcapping", None) is not None
    return "sdpa" if supports_sdpa and not softcapped else "eager"
