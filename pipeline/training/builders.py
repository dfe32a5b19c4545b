"""Builders of the run's models and the student's optimizer and schedule.

- Teacher: a Hugging Face LLaMA-family directory, frozen (``eval()``, ``requires_grad_(False)``,
  only ever called under ``no_grad``), either whole on each rank or loaded *partitioned* into a
  ZeRO-3 engine with no optimizer (``HfDeepSpeedConfig`` alive during ``from_pretrained`` makes
  transformers create each parameter already split across ranks, so a teacher larger than one
  rank's memory loads).
- Student: ``LlamaForCausalLM`` from config fields (or a HF directory), trained by a ZeRO-3 engine
  with AdamW and warmup + cosine (the ``optim`` section, defined here).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.training.deepspeed_config import TeacherPlacement


def build_student_module(cfg: RunConfig, student_cfg, attn_impl: str):
    """The student as a plain nn.Module (full on every rank; ZeRO-3 partitions it in initialize).

    The student is small by design, so building it whole keeps initialisation identical for any
    number of ranks (same seed -> same weights), which the 1-rank vs 2-rank test relies on."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if cfg.student.init_from:
        model = AutoModelForCausalLM.from_pretrained(cfg.student.init_from, dtype=torch.float32,
                                                     attn_implementation=attn_impl)
    else:
        torch.manual_seed(cfg.seed)
        student_cfg = copy.deepcopy(student_cfg)
        student_cfg._attn_implementation = attn_impl
        model = LlamaForCausalLM(student_cfg).to(torch.float32)
    model.config.use_cache = False
    if cfg.student.activation_checkpointing:
        # Non-reentrant: the SHD loss is created inside the checkpointed layer and kept on the side;
        # reentrant checkpointing would detach it from the parameters.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)  # norms and biases are not decayed
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def lr_lambda(cfg: RunConfig):
    """Multiplier of optim.lr at optimizer step s: linear warmup, then cosine to min_lr."""
    o = cfg.optim

    def f(step: int) -> float:
        if o.warmup_steps > 0 and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        span = max(1, o.max_steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return (o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))) / o.lr

    return f


def build_student_engine(cfg: RunConfig, model, ds_config: dict):
    import deepspeed

    opt = build_optimizer(cfg, model)
    fn = lr_lambda(cfg)
    engine, _, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, config=ds_config,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, fn))
    return engine, sched


def build_teacher(cfg: RunConfig, placement: TeacherPlacement, ds_config: dict, attn_impl: str,
                  dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The frozen teacher where ``placement`` says: a plain module on this rank's device
    (replicated), or a ZeRO-3 engine with no optimizer (partitioned, node)."""
    if placement.kind != "replicated":
        return build_teacher_engine(cfg, ds_config, attn_impl, dtype)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.teacher.path, dtype=dtype, attn_implementation=attn_impl,
                                                 device_map={"": str(device)})
    model.config.use_cache = False
    model.eval()
    model.requires_grad_(False)
    return model


def build_teacher_engine(cfg: RunConfig, ds_config: dict, attn_impl: str, dtype: torch.dtype):
    """Teacher loaded partitioned across ranks into a ZeRO-3 engine with no optimizer, frozen."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # Alive during from_pretrained: transformers then creates every parameter under
    # deepspeed.zero.Init, i.e. already partitioned (local numel 0, full size in ds_numel).
    dschf = HfDeepSpeedConfig(ds_config)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.teacher.path, dtype=dtype,
                                                     attn_implementation=attn_impl)
    finally:
        del dschf  # the weakref dies with it: later models are not zero.Init'ed behind our back
    return frozen_engine(model, ds_config)


def frozen_engine(model: torch.nn.Module, ds_config: dict):
    """``model`` frozen in a ZeRO-3 engine with no optimizer (forward only, partitioned)."""
    import deepspeed

    model.config.use_cache = False
    model.eval()
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine
