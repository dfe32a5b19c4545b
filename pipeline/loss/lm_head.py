"""The LM head as a loss: a causal LM's forward returns CE/KD sums instead of ``[B, T, vocab]`` logits.

A Hugging Face causal LM ends with ``logits = lm_head(hidden)``. ``intercept(model, fn)`` makes the
next call of that head return ``fn(head, hidden)`` instead, once, inside the model's own forward:
under ZeRO-3 that is where the head's weight is gathered (and where the gradient flowing back into
it is reduce-scattered), so the chunked loss of `pipeline.loss.ce_kd.head_ce_kd` sees the full weight
without a second gather. Outside ``intercept`` the head is the plain linear layer it was, so
exports, generation and tests that read ``.logits`` see no change.

The teacher's head returns its input under ``intercept``: the student's loss then computes the
teacher's logits chunk by chunk from those hidden states and a copy of the teacher's head weight.
That is exact only for families whose logits are a linear function of the head's output
(`LINEAR_HEAD_FAMILIES`); any other teacher gives its full logits.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from pipeline.loss.ce_kd import TeacherRows, head_ce_kd

LINEAR_HEAD_FAMILIES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "granite"})
"""model_types whose forward turns the head's output into logits linearly (granite: / logits_scaling)."""


def _head(model: torch.nn.Module) -> torch.nn.Module:
    head = getattr(model, "module", model).get_output_embeddings()
    if not hasattr(head, "_intercept"):
        head._intercept = None
        head.forward = types.MethodType(_forward, head)
    return head


def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
    fn, self._intercept = self._intercept, None
    if fn is None:
        return F.linear(hidden, self.weight, self.bias)
    return fn(self, hidden)


@contextmanager
def intercept(model: torch.nn.Module, fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
              ) -> Iterator[None]:
    """During the block, the model's next LM-head call returns ``fn(head, hidden)``."""
    head = _head(model)
    if head.bias is not None:
        raise ValueError(f"{type(head).__name__} has a bias: the chunked LM-head loss supports bias-free heads")
    head._intercept = fn
    try:
        yield
    finally:
        missed, head._intercept = head._intercept is not None, None
    if missed:
        raise RuntimeError(f"{type(getattr(model, 'module', model)).__name__}'s forward did not call its "
                           "output embeddings (lm_head): the chunked LM-head loss cannot run on it")


def passes_hidden(model: torch.nn.Module) -> bool:
    """Whether the teacher's logits may be rebuilt from its head's input (see LINEAR_HEAD_FAMILIES)."""
    m = getattr(model, "module", model)
    return m.config.model_type in LINEAR_HEAD_FAMILIES and m.get_output_embeddings().bias is None


def _weight_copy(head: torch.nn.Module) -> torch.Tensor:
    """The head's weight, still valid after the head's forward (ZeRO-3 frees a gathered weight then)."""
    w = head.weight.detach()
    return w.clone() if hasattr(head.weight, "ds_id") else w


def teacher_rows(teacher: torch.nn.Module, inp: torch.Tensor, mask: torch.Tensor | None, *,
                 keep_logits: bool) -> TeacherRows | None:
    """Run the teacher forward (call under no_grad); its logits as rows for the student's KD, or
    None when ``keep_logits`` is False (the forward runs for the attention maps only).

    Families in LINEAR_HEAD_FAMILIES give their head's input and a copy of the head's weight
    (``[B*T, H]`` + ``[V, H]`` instead of ``[B*T, V]``); any other teacher its full logits.
    """
    if not passes_hidden(teacher):
        logits = teacher(input_ids=inp, attention_mask=mask, use_cache=False).logits
        return TeacherRows(logits=logits.reshape(-1, logits.shape[-1])) if keep_logits else None
    weight: list[torch.Tensor] = []

    def keep_hidden(head, hidden):
        if not keep_logits:
            return hidden[..., :0]
        weight.append(_weight_copy(head))
        return hidden  # granite's forward divides it by logits_scaling: still linear

    with intercept(teacher, keep_hidden):
        hidden = teacher(input_ids=inp, attention_mask=mask, use_cache=False).logits
    return TeacherRows(hidden=hidden.reshape(-1, hidden.shape[-1]), weight=weight[0]) if weight else None


def ce_sum(model: torch.nn.Module, inp: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor,
           valid: torch.Tensor, *, chunk: int, vocab: int) -> torch.Tensor:
    """Sum of the model's CE over valid positions (float32 scalar), without full logits."""
    def loss(head, hidden):
        return head_ce_kd(hidden, head.weight, labels, valid, chunk=chunk, vocab=vocab)[1]

    with intercept(model, loss):
        return model(input_ids=inp, attention_mask=mask, use_cache=False).logits
