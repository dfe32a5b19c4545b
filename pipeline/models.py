"""Teacher and student models, their DeepSpeed configs, and the compatibility checks.

- Teacher: a Hugging Face LLaMA-family directory loaded *partitioned* into a ZeRO-3 engine with
  no optimizer (``HfDeepSpeedConfig`` alive during ``from_pretrained`` makes transformers create
  each parameter already split across ranks, so a teacher larger than one rank's memory loads).
  Frozen: ``eval()``, ``requires_grad_(False)``, only ever called under ``no_grad``.
- Student: ``LlamaForCausalLM`` from config fields (or a HF directory), trained by a ZeRO-3
  engine with AdamW and warmup + cosine.

Every incompatibility is found here, before any compute, with a message that names the fix.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.indexed import sha256_file
from pipeline import architectures
from pipeline.config import ConfigError, RunConfig

# --------------------------------------------------------------------------------------------
# Precision and DeepSpeed configs
# --------------------------------------------------------------------------------------------

# Keys of the DeepSpeed JSON that this config owns: the JSON may omit them or say "auto".
_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
          "gradient_clipping")


def resolve_dtype(cfg: RunConfig) -> torch.dtype:
    p = cfg.deepspeed.precision
    if p == "auto":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else torch.float32
    return torch.bfloat16 if p == "bf16" else torch.float32


@dataclass(frozen=True)
class TeacherPlacement:
    """Where the frozen teacher's weights live, resolved for this launch, and what a forward moves.

    ``kind`` is ``partitioned`` (ZeRO-3 over all ``world`` ranks), ``replicated`` (whole on every
    rank) or ``node`` (ZeRO-3 within each node of ``ranks_per_node`` ranks, through ZeRO++ hpZ's
    secondary partition, so the all-gathers of every forward stay inside the node).
    """

    kind: str
    world: int
    ranks_per_node: int

    @property
    def hpz_partition_size(self) -> int:
        return self.ranks_per_node if self.kind == "node" else 1

    def param_bytes_per_rank(self, teacher_bytes: int) -> float:
        """Teacher parameter bytes resident on one rank (the GPU's share; offload moves it to CPU)."""
        if self.kind == "replicated":
            return float(teacher_bytes)
        secondary = teacher_bytes / self.ranks_per_node if self.kind == "node" else 0.0
        return teacher_bytes / self.world + secondary

    def gathered_bytes_per_forward(self, teacher_bytes: int) -> tuple[float, float]:
        """(bytes one rank receives per teacher forward, of which across nodes), ZeRO-3's
        small persistent parameters ignored."""
        if self.kind == "replicated":
            return 0.0, 0.0
        if self.kind == "node":
            return teacher_bytes * (self.ranks_per_node - 1) / self.ranks_per_node, 0.0
        return (teacher_bytes * (self.world - 1) / self.world,
                teacher_bytes * (self.world - self.ranks_per_node) / self.world)


def resolve_placement(cfg: RunConfig, world: int, ranks_per_node: int) -> TeacherPlacement:
    """``teacher.placement`` for this launch: ``node`` with one rank per node is ``replicated``, on
    a single node it is ``partitioned`` (the same thing, without hpZ's second copy)."""
    kind = cfg.teacher.placement
    if kind == "node":
        if world % ranks_per_node:
            raise ConfigError(f"teacher.placement=node: {world} ranks are not a whole number of nodes of "
                              f"{ranks_per_node} ranks (LOCAL_WORLD_SIZE): launch the same number of "
                              f"processes on every node, or use teacher.placement=partitioned")
        if ranks_per_node == 1:
            kind = "replicated"
        elif ranks_per_node >= world:
            kind = "partitioned"
    return TeacherPlacement(kind=kind, world=world, ranks_per_node=min(ranks_per_node, world))


def load_ds_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config: {p} does not exist (see ds_configs/ for examples)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {p} is not valid JSON: {e}") from None


def build_ds_configs(cfg: RunConfig, world_size: int,
                     placement: TeacherPlacement | None = None) -> tuple[dict, dict]:
    """(student_ds_config, teacher_ds_config) filled from the run config; the teacher's is for a
    ZeRO-3 placement (partitioned, or node with hpZ), unused when the teacher is replicated.

    A value in the JSON that contradicts the run config is refused rather than silently
    overridden (one source of truth per setting)."""
    base = load_ds_json(cfg.deepspeed.config)
    dtype = resolve_dtype(cfg)
    want = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum_steps,
        "train_batch_size": cfg.data.micro_batch_size * cfg.optim.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for k in _OWNED:
        if k in base and base[k] != "auto" and base[k] != want[k]:
            raise ConfigError(f"deepspeed.config {cfg.deepspeed.config} sets {k}={base[k]!r} but the run "
                              f"config implies {want[k]!r}: set it to \"auto\" (or remove it) in the JSON "
                              f"and change the run config (data.micro_batch_size, optim.grad_accum_steps, "
                              f"optim.grad_clip) instead")
    for k in ("optimizer", "scheduler", "fp16"):
        if k in base and (k != "fp16" or base[k].get("enabled", False) not in (False, "auto")):
            raise ConfigError(f"deepspeed.config {cfg.deepspeed.config} has a '{k}' section: remove it "
                              f"(the optimizer and schedule come from the run config's 'optim' section; "
                              f"fp16 is not supported, use deepspeed.precision=bf16)")
    zero = base.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ConfigError(f"deepspeed.config {cfg.deepspeed.config}: zero_optimization.stage must be 3")
    student = copy.deepcopy(base)
    student.update(want)
    student["bf16"] = {"enabled": dtype == torch.bfloat16}
    student.pop("fp16", None)
    student["zero_allow_untested_optimizer"] = True  # torch.optim.AdamW, see build_optimizer
    student.setdefault("steps_per_print", 2**62)
    student.setdefault("wall_clock_breakdown", False)

    teacher_zero = {k: v for k, v in zero.items() if k.startswith("stage3_") or k in ("stage",)}
    teacher_zero.pop("stage3_gather_16bit_weights_on_model_save", None)
    if cfg.teacher.offload_params:
        teacher_zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if placement is not None and placement.hpz_partition_size > 1:
        teacher_zero["zero_hpz_partition_size"] = placement.hpz_partition_size
    teacher = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.data.micro_batch_size * world_size,
        "zero_optimization": teacher_zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return student, teacher


# --------------------------------------------------------------------------------------------
# Model configs and compatibility checks
# --------------------------------------------------------------------------------------------


def teacher_hf_config(cfg: RunConfig):
    from transformers import AutoConfig

    p = Path(cfg.teacher.path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"teacher.path {p} is not a Hugging Face model directory (no config.json)")
    return AutoConfig.from_pretrained(p)


def student_hf_config(cfg: RunConfig, tokenizer_vocab: int):
    from transformers import AutoConfig, LlamaConfig

    s = cfg.student
    if s.init_from:
        p = Path(s.init_from)
        if not (p / "config.json").is_file():
            raise ConfigError(f"student.init_from {p} is not a Hugging Face model directory (no config.json)")
        return AutoConfig.from_pretrained(p)
    inter = s.intermediate_size or int(math.ceil(s.hidden_size * 8 / 3 / 64) * 64)
    return LlamaConfig(
        vocab_size=s.vocab_size or tokenizer_vocab,
        hidden_size=s.hidden_size,
        intermediate_size=inter,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads or s.num_heads,
        max_position_embeddings=s.max_position_embeddings,
        rope_theta=s.rope_theta,
        rms_norm_eps=s.rms_norm_eps,
        tie_word_embeddings=s.tie_word_embeddings,
        initializer_range=s.init_std,
        use_cache=False,
    )


def model_shape(hf_config) -> dict:
    """The architecture fields a checkpoint depends on (resume refuses a change)."""
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
    return {k: getattr(hf_config, k, None) for k in keys}


def distill_pairs(cfg: RunConfig, student_cfg, teacher_cfg) -> dict[int, int]:
    """{student layer: teacher layer} of the layers that get the SHD term."""
    from pipeline.shd import layer_map

    ls, lt = student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers
    d = cfg.distill
    if d.layer_map is not None:
        if len(d.layer_map) != ls:
            raise ConfigError(f"distill.layer_map has {len(d.layer_map)} entries but the student has {ls} "
                              f"layers: give one teacher layer per student layer")
        bad = [t for t in d.layer_map if not 0 <= t < lt]
        if bad:
            raise ConfigError(f"distill.layer_map entries {bad} are out of range: the teacher has {lt} "
                              f"layers (valid 0..{lt - 1})")
    mapping = layer_map(ls, lt, d.layer_map)
    layers = d.student_layers if d.student_layers is not None else list(range(ls))
    bad = [s for s in layers if not 0 <= s < ls]
    if bad:
        raise ConfigError(f"distill.student_layers entries {bad} are out of range: the student has {ls} "
                          f"layers (valid 0..{ls - 1})")
    return {s: int(mapping[s]) for s in sorted(layers)}


def check_compatibility(cfg: RunConfig, student_cfg, teacher_cfg, tokenizer_vocab: int) -> None:
    """Raise ConfigError naming the fix for every model/tokenizer/data mismatch (before any compute)."""
    T = cfg.data.seq_len
    models = [("student", student_cfg)] + ([("teacher", teacher_cfg)] if teacher_cfg is not None else [])
    for name, mc in models:
        if mc.vocab_size < tokenizer_vocab:
            raise ConfigError(f"{name} vocab size ({mc.vocab_size}) is smaller than the tokenizer's "
                              f"({tokenizer_vocab}): use a {name} built for this tokenizer")
        if mc.vocab_size != tokenizer_vocab and not cfg.distill.allow_padded_vocab:
            raise ConfigError(f"{name} vocab size ({mc.vocab_size}) differs from the tokenizer's "
                              f"({tokenizer_vocab}): if the extra rows are padding set "
                              f"distill.allow_padded_vocab=true, otherwise use a {name} built for this "
                              f"tokenizer (student.vocab_size empty = the tokenizer's)")
        maxpos = getattr(mc, "max_position_embeddings", None)
        if maxpos is not None and T > maxpos:
            raise ConfigError(f"data.seq_len ({T}) exceeds the {name}'s max_position_embeddings ({maxpos}): "
                              f"lower data.seq_len")
    if teacher_cfg is None:
        return
    if cfg.uses_shd:
        pairs = distill_pairs(cfg, student_cfg, teacher_cfg)
        n, m = student_cfg.num_attention_heads, teacher_cfg.num_attention_heads
        for s, t in pairs.items():
            if n > m:
                raise ConfigError(f"student layer {s} has {n} heads but its teacher layer {t} has {m}: SHD "
                                  f"needs student heads <= teacher heads; lower student.num_heads or set "
                                  f"distill.w_shd=0")
        # head dims may differ: SHD compares attention maps, not vectors


def check_tokenizer(cfg: RunConfig, manifest) -> None:
    """The data manifest's tokenizer must be the configured tokenizer directory's."""
    if not cfg.data.tokenizer_dir:
        return
    from pipeline.data import tokenizer_identity

    ident = tokenizer_identity(cfg.data.tokenizer_dir)
    if ident != manifest.tokenizer:
        diff = [f for f in ("vocab_size", "bos_id", "eos_id", "pad_id", "unk_id", "files_sha256")
                if getattr(ident, f) != getattr(manifest.tokenizer, f)]
        raise ConfigError(f"data.tokenizer_dir {cfg.data.tokenizer_dir} does not match the tokenizer the "
                          f"data in {cfg.data.dir} was prepared with (differs in: {', '.join(diff)}): "
                          f"point data.tokenizer_dir at that tokenizer or re-run data_prep")


# --------------------------------------------------------------------------------------------
# Identity of the teacher (for resume checks): a content hash, re-read only when a file changes
# --------------------------------------------------------------------------------------------

#: The files of a Hugging Face model directory that determine the teacher's outputs.
TEACHER_FILE_PATTERNS = ("config.json", "*.index.json", "*.safetensors", "*.bin", "*.pt", "*.pth")


def teacher_identity(path: str | Path, known: dict | None = None) -> tuple[dict, dict]:
    """(identity, file records) of a teacher directory.

    identity = {"path", "content_sha256"}: a hash over the sha256 of every file that defines the
    model, so weights replaced in place (same shapes) are seen. File records {name: {bytes,
    mtime_ns, sha256}} are stored with each checkpoint; passing them back as ``known`` reuses a
    file's hash while its size and modification time are unchanged, so a requeue does not re-read
    a 100 GB teacher.
    """
    p = Path(path)
    known = known or {}
    records = {}
    for f in sorted({f for pattern in TEACHER_FILE_PATTERNS for f in p.glob(pattern) if f.is_file()}):
        st = f.stat()
        old = known.get(f.name, {})
        same = old.get("bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
        records[f.name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                           "sha256": old["sha256"] if same and "sha256" in old else sha256_file(f)}
    h = hashlib.sha256("".join(f"{n}:{r['sha256']}\n" for n, r in records.items()).encode())
    return {"path": str(p.resolve()), "content_sha256": h.hexdigest()}, records


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


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
    for name, p in model.named_parameters():
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
    import deepspeed
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
    model.config.use_cache = False
    model.eval()
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def check_eval_split(cfg: RunConfig, model_vocab_size: int) -> None:
    """When the run evaluates, its split must be readable now, not at the first evaluation."""
    from pipeline.data import DataError, PackedSampleReader

    e = cfg.eval
    if not (e.every_steps > 0 or e.at_end):
        return
    try:
        PackedSampleReader(cfg.data.dir, split=e.split, seq_len=cfg.data.seq_len, verify_checksums=False,
                           model_vocab_size=model_vocab_size)
    except DataError as err:
        raise ConfigError(f"evaluation is on (eval.every_steps={e.every_steps}, eval.at_end={e.at_end}) but "
                          f"eval.split={e.split!r} cannot be read: {err}. Re-shard with a val split "
                          f"(python -m data_prep.shard ... --val-fraction 0.01), set eval.split to a split the "
                          f"data has, or turn evaluation off (eval.every_steps=0 eval.at_end=false)") from None


# --------------------------------------------------------------------------------------------
# Preflight: every check that needs no process group and no weights
# --------------------------------------------------------------------------------------------


class Preflight:
    """Config + manifest + model configs, checked together before anything is built."""

    def __init__(self, cfg: RunConfig) -> None:
        from pipeline.data import read_manifest

        self.cfg = cfg
        self.manifest = read_manifest(cfg.data.dir)
        tok = self.manifest.tokenizer
        self.vocab: int = tok.vocab_size
        self.pad_id: int | None = tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else None
        check_tokenizer(cfg, self.manifest)
        self.teacher_cfg = teacher_hf_config(cfg) if cfg.uses_teacher else None
        self.student_cfg = student_hf_config(cfg, self.vocab)
        if cfg.uses_shd:  # from the configs alone, before any weights load
            architectures.check_distillable("teacher", self.teacher_cfg)
            architectures.check_distillable("student", self.student_cfg)
        check_compatibility(cfg, self.student_cfg, self.teacher_cfg, self.vocab)
        self.pairs = distill_pairs(cfg, self.student_cfg, self.teacher_cfg) if cfg.uses_shd else None
        if self.pairs is not None:
            architectures.check_windows(self.student_cfg, self.teacher_cfg, self.pairs, cfg.data.seq_len)
        check_eval_split(cfg, self.student_cfg.vocab_size)
        build_ds_configs(cfg, 1)  # JSON problems surface here too
