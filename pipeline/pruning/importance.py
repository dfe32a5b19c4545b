"""Importance of every prunable unit of the teacher, from one calibration pass (Minitron's
activation-based estimates, Muralidharan et al. 2024, section 2).

Over the calibration tokens (mean over batch and sequence):

- layer (depth): block influence 1 - cos(input hidden state, output hidden state) of the decoder
  layer (a layer that barely turns the residual stream matters little);
- attention head: the L2 norm of the head's attention output (its d_h slice of o_proj's input,
  A_h V_h before the output projection); a kv group scores the sum of its query heads;
- MLP neuron: |act_fn(gate) * up| (down_proj's input);
- embedding channel: |RMSNorm output| (weight applied), summed over every RMSNorm that reads the
  residual stream: each layer's input and post-attention norms and the final norm.

Forward hooks reduce each batch's activations to these per-unit sums at once (float64, on the
model's device) and nothing else is kept, so memory is that of one teacher forward (the LM head is
not run: no [B, T, vocab] logits).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.reader import PackedSampleReader

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle
    from transformers import PreTrainedModel

Hook = Callable[..., None]


@dataclass(frozen=True)
class Importance:
    """Mean importance of each unit of the teacher over `tokens` calibration tokens (float64, CPU)."""

    layers: Tensor  # [L] block influence
    heads: Tensor  # [L, H] per query head
    neurons: Tensor  # [L, I] per MLP neuron
    channels: Tensor  # [D] per hidden channel
    tokens: int

    def kv_groups(self, num_kv_heads: int) -> Tensor:
        """[L, KV]: each kv group's importance, the sum of its query heads' (heads h*g .. h*g+g-1)."""
        layers, heads = self.heads.shape
        return self.heads.view(layers, num_kv_heads, heads // num_kv_heads).sum(-1)


def calibration_reader(data_dir: str | Path, *, seq_len: int, seed: int, vocab_size: int) -> PackedSampleReader:
    """The trainer's reader of the training split (packed samples, no padding, token ids checked
    against the teacher's vocabulary); its state names the data it reads (`data_sha256`)."""
    return PackedSampleReader(data_dir, split="train", seq_len=seq_len, seed=seed, model_vocab_size=vocab_size)


def calibration_batches(reader: PackedSampleReader, *, batches: int, batch_size: int) -> Iterator[Tensor]:
    """`batches` input batches [batch_size, seq_len] in the reader's shuffled order."""
    for _ in range(batches):
        yield reader.next_batch(batch_size)[:, :-1]  # a sample is seq_len inputs + the last one's target


def _decoder_layers(model: PreTrainedModel) -> list[Any]:
    return list(model.model.layers)


class _Sums:
    """Per-unit running sums, added to by forward hooks (one reduction per batch and module)."""

    def __init__(self, model: PreTrainedModel) -> None:
        cfg = model.config
        device = next(model.parameters()).device
        layers = cfg.num_hidden_layers
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.layers, self.heads = zeros(layers), zeros(layers, cfg.num_attention_heads)
        self.neurons, self.channels = zeros(layers, cfg.intermediate_size), zeros(cfg.hidden_size)
        self.tokens = 0

    def hooks(self, model: PreTrainedModel) -> list[RemovableHandle]:
        handles = []
        for i, layer in enumerate(_decoder_layers(model)):
            handles.append(layer.register_forward_hook(self._influence(i), with_kwargs=True))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._heads(i, layer.self_attn.head_dim)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._neurons(i)))
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                handles.append(norm.register_forward_hook(self._channels))
        handles.append(model.model.norm.register_forward_hook(self._channels))
        return handles

    def _influence(self, i: int) -> Hook:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(before.float(), after.float(), dim=-1)
            self.layers[i] += (1.0 - cos).sum(dtype=torch.float64)
        return hook

    def _heads(self, i: int, head_dim: int) -> Hook:
        def hook(module: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            per_head = x.reshape(*x.shape[:-1], -1, head_dim).float().norm(dim=-1)  # [B, T, H]
            self.heads[i] += per_head.sum(dim=(0, 1), dtype=torch.float64)
        return hook

    def _neurons(self, i: int) -> Hook:
        def hook(module: torch.nn.Module, args: tuple[Tensor, ...]) -> None:
            self.neurons[i] += args[0].float().abs().sum(dim=(0, 1), dtype=torch.float64)
        return hook

    def _channels(self, module: torch.nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        self.channels += output.float().abs().sum(dim=(0, 1), dtype=torch.float64)

    def means(self) -> Importance:
        n = max(self.tokens, 1)
        return Importance(layers=(self.layers / n).cpu(), heads=(self.heads / n).cpu(),
                          neurons=(self.neurons / n).cpu(), channels=(self.channels / n).cpu(), tokens=self.tokens)


@contextmanager
def _hooked(model: PreTrainedModel, sums: _Sums) -> Iterator[None]:
    handles = sums.hooks(model)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def calibrate(model: PreTrainedModel, batches: Iterable[Tensor],
              progress: Callable[[int, int, float], None] | None = None) -> Importance:
    """Run the teacher (its decoder only: no LM head) on every batch of input ids under no_grad and
    return the mean importance of its layers, heads, neurons and channels; `progress(batches done,
    tokens, seconds)` is called after each batch."""
    model.eval()
    sums = _Sums(model)
    device = next(model.parameters()).device
    start = time.time()
    with _hooked(model, sums), torch.no_grad():
        for b, inputs in enumerate(batches, 1):
            model.model(input_ids=inputs.to(device), use_cache=False)
            sums.tokens += inputs.numel()
            if progress is not None:
                progress(b, sums.tokens, time.time() - start)
    return sums.means()
