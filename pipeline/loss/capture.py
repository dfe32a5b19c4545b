"""Attention capture for SHD through transformers' ``AttentionInterface``.

Two attention functions are registered (selected per model with ``attn_implementation``):

- ``shd_teacher``: stock SDPA attention; for distilled teacher layers it also keeps the layer's
  queries and keys (after RoPE, before GQA repetition), values, and how the layer turns them
  into a map (``map_spec``: its own ``scaling`` and ``sliding_window``, from the kwargs the module
  passes to every attention function), so that the maps SHD distils are the model's own. The
  mixing weights need the layer's output projection W_O, which ZeRO-3 partitions; so they are
  computed in a forward pre-hook of that layer's ``o_proj``, registered *after*
  ``deepspeed.initialize`` so that it runs after ZeRO-3's own pre-hook has gathered
  ``o_proj.weight``; o_proj's input, the layer's attention output per head, is reused there
  (``head_outputs``). The values are dropped there; what is kept per distilled teacher layer is
  q, k ([B, M(_kv), T, d]), W [B, N, M] and the spec.
- ``shd_student``: stock SDPA attention, plus ``pipeline.shd.shd_loss`` for its layer computed
  right there, inside the layer's forward, each side scored with its own module's spec. The loss
  is streaming (no T x T map is kept), and with per-layer activation checkpointing nothing of the
  layer outlives it except the scalar. Which families these functions serve correctly is
  ``pipeline.models.architectures``' table.

Both reach the run's ``ShdChannel`` through a ``shd_channel`` attribute set on the distilled
layers' attention modules (``attach_teacher`` / ``attach_student``). The channel holds three
things apart: the settings (the run's ``distill`` config section itself), what was chosen for the
whole run (``Chosen``: the heads plan=select distils, or the calibrated mixing weights) and the
state of the micro-batch being captured (``MicroBatchCapture``; None between micro-batches, when
both functions are plain SDPA).

``ShdCapture`` is the one object the objective, the trainer, benchmarks and tests drive; it also
registers the two functions (explicitly, not on import). A micro-batch is captured inside
``with capture.micro_batch(mask):``; its losses are computed and recorded while its
``recording`` is true, and ``ShdCapture.layer_losses`` clears that flag before ``backward``:
non-reentrant activation checkpointing runs each layer's forward again during backward to rebuild
its saved tensors, and that re-run, finding the micro-batch's capture with recording off, skips the
SHD loss. The loss saves nothing through autograd's saved-tensor hooks (its gradient w.r.t. q and k,
computed in the forward pass, is kept on the autograd node), so the re-run has nothing to rebuild
for it, and the loss's blockwise pass runs once per step instead of twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from pipeline.shd import MapSpec
from pipeline.shd.masking import compute_dtype

if TYPE_CHECKING:
    from pipeline.config import DistillConfig
    from pipeline.data.reader import Batch

TEACHER_ATTN = "shd_teacher"
STUDENT_ATTN = "shd_student"


@dataclass
class MicroBatchCapture:
    """What one micro-batch's forwards leave for SHD (``ShdCapture.micro_batch``)."""

    attention_mask: torch.Tensor | None  # [B, T], 1 = real token; None = no padding
    recording: bool = True  # the student's layers compute their SHD loss (turned off before backward)
    pending: dict[int, tuple] = field(default_factory=dict)  # teacher layer -> (q, k, v, MapSpec), until its o_proj
    captures: dict[int, tuple] = field(default_factory=dict)  # teacher layer -> (q, k, W, MapSpec)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)  # student layer -> SHD loss
    weight_stats: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> [mean max W, entropy]


@dataclass
class Chosen:
    """Fixed for the whole run and kept in checkpoints (``ShdCapture.calibrated_state``): under
    plan=select the teacher head each student head distils (when attached: from the config for
    select_heads first|random, from the channel's ``source_heads`` for pruned; else from the
    calibration pass), or the static mixing weights of mixing_weights=calibrated (from the
    calibration pass)."""

    selected: dict[int, tuple[int, ...]] = field(default_factory=dict)  # teacher layer -> head per student head
    static_weights: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> W [N, M]


@dataclass
class ShdChannel:
    """What the attention functions and the o_proj hooks of one run share (``module.shd_channel``)."""

    distill: DistillConfig  # the settings: the run's config section, read where they are used
    pairs: dict[int, int]  # student layer -> teacher layer (distilled layers only)
    num_student_heads: int
    num_teacher_heads: int = 0  # set by attach_teacher
    chosen: Chosen = field(default_factory=Chosen)
    batch: MicroBatchCapture | None = None  # the micro-batch being captured; None: both are plain SDPA
    # during ShdCapture.calibrate: teacher layer -> summed statistics (head costs, or Gram tensors)
    calibration: dict[int, torch.Tensor] | None = None
    # select_heads=pruned: student layer -> the teacher head each of its heads was cut from (any head
    # of the teacher layer, not one of a contiguous group), and where that was read (for the log)
    source_heads: dict[int, tuple[int, ...]] | None = None
    source: str = ""

    @property
    def teacher_layers(self) -> set[int]:
        return set(self.pairs.values())


# Attention-function kwargs that change the map beyond scale and window: SHD cannot reproduce them
# (Gemma 2's logit soft-capping, gpt-oss's attention sinks). pipeline.models.architectures refuses such
# teachers from their config; this is the last line, for a module that passes one anyway.
_UNREPRODUCIBLE = ("softcap", "s_aux", "sinks")


def map_spec(module: torch.nn.Module, kwargs: dict) -> MapSpec:
    """The layer's own score scale and sliding window, as it passes them to the attention function.

    Refuses anything else that would change the map (soft-capping, sinks), naming the layer: SHD
    must not compute targets from a map the model does not use. (Attention dropout is not among
    them: the frozen teacher runs in eval mode, and the student's loss is on its scores.)
    """
    bad = [k for k in _UNREPRODUCIBLE if kwargs.get(k) is not None]
    if bad:
        raise RuntimeError(f"{type(module).__name__} layer {module.layer_idx} passes {', '.join(bad)} to its "
                           "attention function, which SHD's maps do not reproduce: set distill.w_shd=0 or use a "
                           "teacher listed in pipeline/models/architectures.py")
    scale = kwargs.get("scaling", getattr(module, "scaling", None))
    return MapSpec(scale=None if scale is None else float(scale), window=kwargs.get("sliding_window"))


def teacher_attention(module, query, key, value, attention_mask, **kwargs):
    chan: ShdChannel | None = getattr(module, "shd_channel", None)
    if chan is not None and chan.batch is not None and module.layer_idx in chan.teacher_layers:
        spec = map_spec(module, kwargs)
        chan.batch.pending[module.layer_idx] = (query.detach(), key.detach(), value.detach(), spec)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def student_attention(module, query, key, value, attention_mask, **kwargs):
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    chan: ShdChannel | None = getattr(module, "shd_channel", None)
    batch = chan.batch if chan is not None else None
    if batch is not None and batch.recording and module.layer_idx in chan.pairs:
        from pipeline.shd import shd_loss

        d = chan.distill
        tq, tk, w, teacher_spec = batch.captures[chan.pairs[module.layer_idx]]
        batch.losses[module.layer_idx] = shd_loss(query, key, tq, tk, w, tau=d.tau_shd,
                                                  attention_mask=batch.attention_mask, block_size=d.shd_block_size,
                                                  merge=d.merge, sharpen=d.sharpen, teacher_spec=teacher_spec,
                                                  student_spec=map_spec(module, kwargs), divergence=d.shd_divergence)
    return out


def _o_proj_pre_hook(chan: ShdChannel, layer: int):
    def hook(o_proj: torch.nn.Module, args):
        batch = chan.batch
        if batch is None or layer not in batch.pending:
            return None
        from pipeline.shd import squeeze_weights

        d, chosen = chan.distill, chan.chosen
        q, k, v, spec = batch.pending.pop(layer)
        weight = o_proj.weight
        full = getattr(weight, "ds_shape", weight.shape)
        if tuple(weight.shape) != tuple(full):  # would mean ZeRO-3 did not gather it before us
            raise RuntimeError(f"teacher layer {layer}: o_proj.weight is not gathered in its pre-forward "
                               f"hook (shape {tuple(weight.shape)}, full {tuple(full)})")
        batch_size, num_heads, length, _ = q.shape
        # o_proj's input is the layer's attention output per head: reused, not recomputed
        head_outputs = args[0].detach().view(batch_size, length, num_heads, v.shape[-1]).transpose(1, 2)
        if chan.calibration is not None:  # ShdCapture.calibrate: statistics only, no target
            stats = _calibration_statistics(chan, q, k, v, weight, head_outputs, spec, batch.attention_mask)
            chan.calibration[layer] = chan.calibration[layer] + stats if layer in chan.calibration else stats
            return None
        if (d.plan == "select" and layer not in chosen.selected) or (
                d.mixing_weights == "calibrated" and layer not in chosen.static_weights):
            raise RuntimeError(f"teacher layer {layer}: {_calibrated_setting(d)} needs the calibration pass "
                               "(ShdCapture.calibrate) before the first step")
        with torch.no_grad():
            if layer in chosen.static_weights:
                w = chosen.static_weights[layer].to(q.device, compute_dtype(q, k, v)).expand(batch_size, -1, -1)
            else:
                w = squeeze_weights(q, k, v, weight, chan.num_student_heads, plan=d.plan,
                                    objective=d.objective, attention_mask=batch.attention_mask,
                                    selection=d.selection, head_outputs=head_outputs, spec=spec,
                                    selected=chosen.selected.get(layer))
            # statistics for logging: mean over (batch, student head) of the max weight and entropy
            ent = -(w.clamp_min(1e-12).log() * w).sum(-1)
            batch.weight_stats[layer] = torch.stack([w.max(-1).values.mean(), ent.mean()]).detach()
        batch.captures[layer] = (q, k, w, spec)
        return None

    return hook


def _calibrated_setting(distill: DistillConfig) -> str:
    """The config setting that asks for a calibration pass."""
    if distill.mixing_weights == "calibrated":
        return "distill.mixing_weights=calibrated"
    return f"distill.select_heads={distill.select_heads}"


def _calibration_statistics(chan: ShdChannel, q, k, v, o_proj_weight, head_outputs, spec: MapSpec,
                            attention_mask: torch.Tensor | None) -> torch.Tensor:
    """One calibration batch's statistics for the setting being calibrated (they add up over batches)."""
    d = chan.distill
    if d.mixing_weights == "calibrated":
        from pipeline.shd.calibrated import gram_statistics

        return gram_statistics(q, k, v, o_proj_weight, chan.num_student_heads, plan=d.plan,
                               attention_mask=attention_mask, head_outputs=head_outputs, spec=spec)
    from pipeline.shd.selection import selection_costs

    return selection_costs(q, k, v, o_proj_weight, chan.num_student_heads, criterion=d.select_heads,
                           attention_mask=attention_mask, head_outputs=head_outputs, spec=spec)


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """{layer_idx: attention module} of a LLaMA-family model (modules with q/k/v/o projections)."""
    out = {}
    for m in model.modules():
        if all(hasattr(m, a) for a in ("layer_idx", "q_proj", "k_proj", "o_proj")):
            out[m.layer_idx] = m
    return out


def attach_teacher(model: torch.nn.Module, chan: ShdChannel) -> list:
    """Point the distilled teacher layers at the channel; call after deepspeed.initialize."""
    from pipeline.shd.plan import SELECT_HEADS, selected_heads, squeeze_plan

    mods = attention_modules(model)
    handles = []
    heads = chan.num_teacher_heads = model.config.num_attention_heads
    d = chan.distill
    if d.plan == "select" and d.select_heads == "pruned":  # the heads each student head was cut from
        chan.chosen.selected = _source_selection(chan, heads)
    for t in sorted(chan.teacher_layers):
        if t not in mods:
            raise ValueError(f"teacher has no attention module with layer_idx {t}")
        if d.plan == "select" and d.select_heads in SELECT_HEADS:  # a pure function of the config
            chan.chosen.selected[t] = selected_heads(squeeze_plan(heads, chan.num_student_heads, "select"),
                                                     d.select_heads, d.select_seed, t)
        mods[t].shd_channel = chan
        handles.append(mods[t].o_proj.register_forward_pre_hook(_o_proj_pre_hook(chan, t)))
    return handles


def _source_selection(chan: ShdChannel, num_teacher_heads: int) -> dict[int, tuple[int, ...]]:
    """select_heads=pruned: {teacher layer: the teacher head each student head distils} from the
    channel's ``source_heads`` (one student layer per teacher layer, or several that agree)."""
    if chan.source_heads is None or set(chan.source_heads) != set(chan.pairs):
        raise ValueError("distill.select_heads=pruned needs the source heads of every distilled student layer "
                         "(ShdCapture.from_config(..., source_heads=...), from the pruning record)")
    selected: dict[int, tuple[int, ...]] = {}
    for s, t in sorted(chan.pairs.items()):
        heads = tuple(int(h) for h in chan.source_heads[s])
        if len(heads) != chan.num_student_heads or not all(0 <= h < num_teacher_heads for h in heads):
            raise ValueError(f"student layer {s}: source heads {list(heads)} must name one teacher head "
                             f"(0..{num_teacher_heads - 1}) for each of its {chan.num_student_heads} heads")
        if selected.setdefault(t, heads) != heads:
            raise ValueError(f"teacher layer {t} is distilled by student layers with other source heads "
                             f"({list(selected[t])}, {list(heads)})")
    return selected


def attach_student(model: torch.nn.Module, chan: ShdChannel) -> None:
    mods = attention_modules(model)
    for s in chan.pairs:
        if s not in mods:
            raise ValueError(f"student has no attention module with layer_idx {s}")
        mods[s].shd_channel = chan


def register() -> None:
    """Register both functions with transformers (idempotent; needed before a model is built with
    ``attn_implementation`` TEACHER_ATTN or STUDENT_ATTN); the masks are built as for SDPA."""
    AttentionInterface.register(TEACHER_ATTN, teacher_attention)
    AttentionInterface.register(STUDENT_ATTN, student_attention)
    AttentionMaskInterface.register(TEACHER_ATTN, sdpa_mask)
    AttentionMaskInterface.register(STUDENT_ATTN, sdpa_mask)
    assert TEACHER_ATTN in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


class ShdCapture:
    """The SHD attention capture of one run, as the objective, the trainer, benchmarks and tests
    drive it: build the models with ``teacher_impl`` / ``student_impl``, ``attach`` them (after
    ``deepspeed.initialize``), then per micro-batch::

        with capture.micro_batch(mask):
            teacher forward, student forward
            capture.layer_losses()   # recording stops here
            backward                 # activation checkpointing's re-runs find recording off
    """

    teacher_impl = TEACHER_ATTN
    student_impl = STUDENT_ATTN

    def __init__(self, chan: ShdChannel) -> None:
        register()
        self.chan = chan
        self.last_weight_stats: dict[int, torch.Tensor] = {}  # the last micro-batch's, for the step's log

    @classmethod
    def from_config(cls, distill: DistillConfig, pairs: dict[int, int], num_student_heads: int, *,
                    source_heads: dict[int, tuple[int, ...]] | None = None, source: str = "") -> ShdCapture:
        """``source_heads`` (select_heads=pruned): {student layer: the teacher head each student head
        distils}, read by ``source`` (``pipeline.training.pruned``)."""
        return cls(ShdChannel(distill, pairs, num_student_heads, source_heads=source_heads, source=source))

    @property
    def pairs(self) -> dict[int, int]:
        """{student layer: teacher layer} of the distilled layers."""
        return self.chan.pairs

    @property
    def chosen(self) -> Chosen:
        return self.chan.chosen

    def attach(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        """Point both models' distilled layers at the channel (plain modules, not engines)."""
        attach_student(student, self.chan)
        attach_teacher(teacher, self.chan)

    @contextmanager
    def micro_batch(self, attention_mask: torch.Tensor | None) -> Iterator[MicroBatchCapture]:
        """Capture one micro-batch: the teacher's and the student's forwards inside the block record
        into its state, which is dropped when the block ends (keep the backward inside it)."""
        state = self.chan.batch = MicroBatchCapture(attention_mask)
        try:
            yield state
        finally:
            self.chan.batch = None
            self.last_weight_stats = state.weight_stats

    def layer_losses(self) -> dict[int, torch.Tensor]:
        """{student layer: SHD loss} of this micro-batch's forward; recording stops here, so that
        activation checkpointing's re-run of the forward in backward does not compute it again."""
        batch = self.chan.batch
        batch.recording = False
        if set(batch.losses) != set(self.chan.pairs):
            raise RuntimeError(f"SHD losses recorded for layers {sorted(batch.losses)}, "
                               f"expected {sorted(self.chan.pairs)}")
        return dict(sorted(batch.losses.items()))

    def weight_stats(self) -> dict[int, tuple[float, float]]:
        """{student layer: (mean max mixing weight, mean entropy)} of the last micro-batch."""
        stats = self.last_weight_stats
        return {s: (stats[t][0].item(), stats[t][1].item()) for s, t in sorted(self.chan.pairs.items()) if t in stats}

    @property
    def needs_calibration(self) -> bool:
        """Whether a calibration pass (`calibrate`) chooses the heads of plan "select" or the static
        mixing weights (distill.mixing_weights=calibrated)."""
        from pipeline.shd.selection import CRITERIA

        d = self.chan.distill
        return (d.plan == "select" and d.select_heads in CRITERIA) or d.mixing_weights == "calibrated"

    @property
    def calibrated_setting(self) -> str:
        """The config setting that asks for the calibration pass, as the run log names it."""
        return _calibrated_setting(self.chan.distill)

    def calibrate(self, teacher_forward: Callable[[Batch], object], batches: Iterable[Batch],
                  all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Choose the "select" heads or the static mixing weights: ``teacher_forward(batch)`` over
        ``batches``, the statistics summed over them and over ranks (``all_reduce``: every rank must
        run as many batches); then the least-cost head of each group, or the merge rounds solved
        once on the summed Gram tensors. Returns `calibrated_state()`."""
        from pipeline.shd.calibrated import calibrated_weights
        from pipeline.shd.plan import squeeze_plan
        from pipeline.shd.selection import pick_heads

        chan, d = self.chan, self.chan.distill
        chan.calibration = {}
        try:
            for batch in batches:
                with self.micro_batch(batch.mask), torch.no_grad():
                    teacher_forward(batch)
            costs = {t: all_reduce(c) for t, c in sorted(chan.calibration.items())}
        finally:
            chan.calibration = None
        if set(costs) != chan.teacher_layers:
            raise RuntimeError(f"calibration saw teacher layers {sorted(costs)}, "
                               f"expected {sorted(chan.teacher_layers)}")
        if d.mixing_weights == "calibrated":
            chan.chosen.static_weights = {
                t: calibrated_weights(stats, chan.num_teacher_heads, chan.num_student_heads, plan=d.plan,
                                      objective=d.objective, selection=d.selection).float()
                for t, stats in costs.items()}
        else:
            chan.chosen.selected = {t: pick_heads(squeeze_plan(len(c), chan.num_student_heads, "select"), c)
                                    for t, c in costs.items()}
        return self.calibrated_state()

    def calibrated_state(self) -> dict:
        """What a calibration pass chose, as a checkpoint keeps it (JSON): ``{"shd_selected_heads":
        {layer: heads}}`` or ``{"shd_static_weights": {layer: W rows}}``; empty without one."""
        chosen = self.chan.chosen
        if chosen.static_weights:
            return {"shd_static_weights": {str(t): w.tolist() for t, w in sorted(chosen.static_weights.items())}}
        if chosen.selected:
            return {"shd_selected_heads": {str(t): list(h) for t, h in sorted(chosen.selected.items())}}
        return {}

    def use_calibrated(self, state: dict) -> bool:
        """Take what a resumed run's calibration chose (`calibrated_state()` keys of its trainer state);
        False when the state holds nothing for this run's setting (then calibrate)."""
        chosen = self.chan.chosen
        if self.chan.distill.mixing_weights == "calibrated":
            saved = state.get("shd_static_weights")
            if saved:
                chosen.static_weights = {int(t): torch.tensor(rows, dtype=torch.float32) for t, rows in saved.items()}
        else:
            saved = state.get("shd_selected_heads")
            if saved:
                chosen.selected = {int(t): tuple(int(h) for h in heads) for t, heads in saved.items()}
        return bool(saved)

    def describe(self) -> str:
        chan, d, chosen = self.chan, self.chan.distill, self.chan.chosen
        text = f"SHD plan={d.plan} objective={d.objective} layers (student->teacher) {chan.pairs}"
        if chosen.selected:  # which teacher head each student head learns from
            how = d.select_heads + (f", {chan.source}" if d.select_heads == "pruned" and chan.source else "")
            text += f" | teacher head per student head ({how}): " + ", ".join(
                f"layer {s}<-{t}: {list(chosen.selected[t])}"
                for s, t in sorted(chan.pairs.items()) if t in chosen.selected)
        if chosen.static_weights:  # the fixed mixing weights: {teacher head: weight} per student head
            text += " | calibrated mixing weights per student head: " + "; ".join(
                f"layer {s}<-{t}: " + " ".join(
                    "{" + ", ".join(f"{m}: {w:.2f}" for m, w in enumerate(row.tolist()) if w > 0) + "}"
                    for row in chosen.static_weights[t])
                for s, t in sorted(chan.pairs.items()) if t in chosen.static_weights)
        return text
