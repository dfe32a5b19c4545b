"""Held-out perplexity of a student, and the ``eval`` config section.

One evaluator serves the trainer (a ZeRO-3 engine on every rank) and ``pipeline.evaluate`` (a
ZeRO-3 engine, or a plain model in one process); it needs no optimizer. Every rank reads its
data-parallel share of the evaluated sequences, which are defined for the whole job (the first
``eval.max_batches x micro-batch`` of the split); all ranks run the same number of forwards (a ZeRO-3
forward is collective), and the CE sums are reduced, so the number is the same for any world size.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from pydantic import model_validator

from pipeline import distributed, lm_head
from pipeline.data import PackedSampleReader, split_tokens
from pipeline.settings import ConfigError, Section, setting


class EvalConfig(Section):
    every_steps: int = setting(500, "Held-out perplexity every this many steps (0 = off during training).")
    at_end: bool = setting(True, "Evaluate at the end of the run.")
    max_batches: Optional[int] = setting(
        50, "Evaluate the first max_batches x micro_batch_size sequences of the split, the same ones whatever the "
            "number of ranks; empty = the whole split.")
    micro_batch_size: Optional[int] = setting(None, "Empty = data.micro_batch_size.")
    split: str = setting("val", "Data split used for evaluation.")

    @model_validator(mode="after")
    def _values(self) -> "EvalConfig":
        if self.every_steps < 0:
            raise ConfigError(f"eval.every_steps must be >= 0, got {self.every_steps}")
        return self


class Evaluator:
    """``evaluator(model)`` -> {"eval/loss", "eval/perplexity", "eval/tokens"} over the split."""

    def __init__(self, data_dir: str, *, split: str, seq_len: int, micro_batch_size: int,
                 max_batches: int | None, vocab: int, chunk: int, seed: int = 0,
                 model_vocab_size: int | None = None, device: torch.device | None = None) -> None:
        self.reader = PackedSampleReader(data_dir, split=split, seq_len=seq_len, seed=seed,
                                         dp_rank=distributed.rank(), dp_world_size=distributed.world(),
                                         verify_checksums=False, model_vocab_size=model_vocab_size)
        self.micro_batch_size, self.max_batches = micro_batch_size, max_batches
        self.vocab, self.chunk, self.device = vocab, chunk, device

    def batches(self) -> list[tuple]:
        """This rank's batches, split: its share of the same sequences for any number of ranks, as many
        batches on every rank (`PackedSampleReader.eval_batches`). A rank's empty share of the last
        batch becomes one row whose labels count for nothing: a ZeRO-3 forward is collective."""
        out = []
        for rows in self.reader.eval_batches(self.micro_batch_size, max_batches=self.max_batches):
            if len(rows):
                out.append(split_tokens(rows, self.device))
            else:
                inp, labels, valid, mask = split_tokens(torch.zeros((1, rows.shape[1]), dtype=torch.long), self.device)
                out.append((inp, labels, torch.zeros_like(valid), mask))
        return out

    @torch.no_grad()
    def __call__(self, model, batches: list[tuple] | None = None) -> dict[str, float]:
        """The split's CE and perplexity; ``batches`` = ``self.batches()`` already read, if at hand."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for inp, labels, valid, mask in (self.batches() if batches is None else batches):
                sums[0] += lm_head.ce_sum(model, inp, mask, labels, valid, chunk=self.chunk,
                                          vocab=self.vocab).double()
                sums[1] += valid.sum()
        finally:
            model.train(was_training)
        distributed.all_reduce(sums)
        loss = (sums[0] / sums[1].clamp_min(1)).item()
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": sums[1].item()}
