"""Weights into a Hugging Face model built from its config: the one check that they fit.

Exports (a ZeRO checkpoint's consolidated state), pruned students (sliced teacher tensors) and
GGUF imports (de-quantised tensors) all load a state dict into a freshly built model; a key
missing or left over means the state is not that model's, except a tied LM head, which is the
embedding itself and is tied after loading.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, assign: bool = False) -> str | None:
    """Load ``state`` into ``model`` (``assign``: take the tensors themselves, for a model built on
    the meta device); None when it fits, else what does not fit (the first keys of each kind)."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False, assign=assign)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(missing) - tied)
    if missing or unexpected:
        return f"missing {missing[:5]}, unexpected {sorted(unexpected)[:5]}"
    if tied:
        model.tie_weights()
    return None
