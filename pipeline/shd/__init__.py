"""Squeezing-Heads Distillation (SHD): attention-map distillation across head counts.

Pure PyTorch (no DeepSpeed). The method is specified in docs/shd-method.md:
- `squeeze_plan` says which teacher heads merge into which student head;
- `squeeze_weights` chooses, per sequence, the mixing matrix W [B, N, M] from the teacher's
  queries, keys, values and output projection, without forming attention maps;
- `shd_loss` is the KL between the squeezed teacher maps and the student's maps (either
  direction), streamed over query blocks; `shd_loss_reference` is the dense oracle it is tested against;
- `layer_map` matches student layers to teacher layers;
- `MapSpec` carries a model's own score scale and sliding window into all of them.
"""

from .loss import DIVERGENCES, MERGES, shd_loss
from .masking import MapSpec
from .plan import PLANS, SqueezePlan, layer_map, squeeze_plan
from .reference import attention_maps, shd_loss_reference, squeeze_weights_reference
from .weights import OBJECTIVES, SELECTIONS, squeeze_weights

__all__ = [
    "DIVERGENCES",
    "MERGES",
    "MapSpec",
    "OBJECTIVES",
    "PLANS",
    "SELECTIONS",
    "SqueezePlan",
    "attention_maps",
    "layer_map",
    "shd_loss",
    "shd_loss_reference",
    "squeeze_plan",
    "squeeze_weights",
    "squeeze_weights_reference",
]
