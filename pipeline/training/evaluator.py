"""Held-out perplexity of a student, and the ``eval`` config section.

One evaluator serves the trainer (a ZeRO-3 engine on every rank) and ``pipeline.evaluate`` (a
ZeRO-3 engine, or a plain model in one process); it needs no optimizer. Every rank reads its
data-parallel share of the evaluated sequences, which are defined for the whole job (the first
``eval.max_batches x micro-batch`` of the split); all ranks run the same number of forwards (a ZeRO-3
forward is collective), and the CE sums are reduced, so the number is the same for any world size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch

from pipeline.data.reader import Batch, PackedSampleReader, open_reader, split_tokens
from pipeline.loss import lm_head
from pipeline.runtime import distributed

if TYPE_CHECKING:
    from pipeline.config import RunConfig


class Evaluator:
    """``evaluator(model)`` -> {"eval/loss", "eval/perplexity", "eval/tokens"} over the split."""

    def __init__(self, reader: PackedSampleReader, *, micro_batch_size: int, max_batches: int | None, vocab: int,
                 chunk: int, device: torch.device | None = None) -> None:
        """``reader``: this rank's reader of the evaluated split (``pipeline.data.reader.open_reader``)."""
        self.reader, self.micro_batch_size, self.max_batches = reader, micro_batch_size, max_batches
        self.vocab, self.chunk, self.device = vocab, chunk, device

    @classmethod
    def for_run(cls, cfg: RunConfig, *, model_vocab_size: int, device: torch.device | None) -> Evaluator:
        """The evaluation a run's config asks for (``eval``; the micro-batch of ``data`` when it gives
        none, the LM-head chunk of ``distill``), over this rank's share of the split."""
        e = cfg.eval
        reader = open_reader(cfg.data, e.split, seed=cfg.seed, rank=distributed.rank(), world=distributed.world(),
                             model_vocab_size=model_vocab_size)
        return cls(reader, micro_batch_size=e.micro_batch_size or cfg.data.micro_batch_size, max_batches=e.max_batches,
                   vocab=reader.manifest.tokenizer.vocab_size, chunk=cfg.distill.kd_chunk_size, device=device)

    def batches(self) -> list[Batch]:
        """This rank's batches, split: its share of the same sequences for any number of ranks, as many
        batches on every rank (`PackedSampleReader.eval_batches`). A rank's empty share of the last
        batch becomes one row whose labels count for nothing: a ZeRO-3 forward is collective."""
        out = []
        for rows in self.reader.eval_batches(self.micro_batch_size, max_batches=self.max_batches):
            if len(rows):
                out.append(split_tokens(rows, self.device))
            else:
                empty = split_tokens(torch.zeros((1, rows.shape[1]), dtype=torch.long), self.device)
                out.append(dataclasses.replace(empty, valid=torch.zeros_like(empty.valid)))
        return out

    @torch.no_grad()
    def __call__(self, model, batches: list[Batch] | None = None) -> dict[str, float]:
        """The split's CE and perplexity; ``batches`` = ``self.batches()`` already read, if at hand."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for b in (self.batches() if batches is None else batches):
                sums[0] += lm_head.ce_sum(model, b.input_ids, b.mask, b.labels, b.valid, chunk=self.chunk,
                                          vocab=self.vocab).double()
                sums[1] += b.valid.sum()
        finally:
            model.train(was_training)
        distributed.all_reduce(sums)
        loss = (sums[0] / sums[1].clamp_min(1)).item()
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": sums[1].item()}
