"""In-process checks of the engine's pieces on tiny fp32 models (no process group needed).

- chunked CE/KD equals the dense formulas (values and gradients);
- the SHD term computed inside the student's attention equals ``shd_loss_reference`` on maps
  rebuilt from the same models (right layer, rotary applied, GQA on both sides, padding);
- the loss the objective returns (and logs) is the loss whose gradient is applied;
- activation checkpointing on/off gives the same loss and gradients (no double counting);
- incompatible models / tokenizer / layer maps fail before any compute, naming the fix.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, config_from_dict
from pipeline.data.reader import split_tokens
from pipeline.loss import capture as attn
from pipeline.loss.ce_kd import TeacherRows, ce_kd_sums_reference, head_ce_kd
from pipeline.loss.objective import DistillObjective, StepTotals
from pipeline.shd import shd_loss_reference, squeeze_weights
from pipeline.training.builders import build_student_module, lr_lambda
from pipeline.training.preflight import Preflight
from tests.helpers import tiny_config


@pytest.mark.parametrize("teacher_as", ["hidden", "logits"])
def test_chunked_head_ce_kd_matches_dense(teacher_as):
    """Values and gradients (hidden states and head weight) against full float64 logits."""
    torch.manual_seed(0)
    B, T, V, H = 2, 9, 13, 5
    h = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V + 3, H, dtype=torch.float64, requires_grad=True)  # padded student vocab
    th, tw = torch.randn(B * T, 4, dtype=torch.float64), torch.randn(V + 1, 4, dtype=torch.float64)
    tw[2] = 0.0
    th[0, 0] = 1e4  # a vanishing teacher probability: 0 log 0 = 0
    t_logits = th @ tw.T
    rows = TeacherRows(hidden=th, weight=tw) if teacher_as == "hidden" else TeacherRows(logits=t_logits)
    lab = torch.randint(0, V, (B, T))
    valid = torch.rand(B, T) > 0.3
    total, ce, kl = head_ce_kd(h, w, lab, valid, rows, tau=2.0, chunk=4, vocab=V, w_ce=0.3, w_kl=0.7)
    ref_ce, ref_kl = ce_kd_sums_reference(h @ w.T, lab, valid, t_logits.reshape(B, T, -1), tau=2.0, vocab=V)
    torch.testing.assert_close(ce.double(), ref_ce.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kl.double(), ref_kl.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total.double(), (0.3 * ref_ce + 0.7 * ref_kl).double(), rtol=1e-6, atol=1e-6)
    g_h, g_w = torch.autograd.grad(2.5 * total, (h, w))
    r_h, r_w = torch.autograd.grad(2.5 * (0.3 * ref_ce + 0.7 * ref_kl), (h, w))
    torch.testing.assert_close(g_h, r_h, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_w, r_w, rtol=1e-6, atol=1e-7)
    assert g_w[V:].abs().max() == 0 and g_h[~valid].abs().max() == 0 and g_h[valid].abs().max() > 0


def test_lm_head_intercept_is_one_shot_and_leaves_the_head_a_linear_layer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.loss import lm_head

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    inp = torch.randint(0, 20, (2, 5))
    before = model(input_ids=inp).logits
    with lm_head.intercept(model, lambda head, hidden: hidden.sum()):
        assert model(input_ids=inp).logits.dim() == 0
        assert model(input_ids=inp).logits.shape == (2, 5, 20)  # the next call is a plain head again
    torch.testing.assert_close(model(input_ids=inp).logits, before)
    with pytest.raises(RuntimeError, match="did not call its output embeddings"):
        with lm_head.intercept(model, lambda head, hidden: hidden):
            pass
    with torch.no_grad():
        ce = lm_head.ce_sum(model, inp[:, :-1], None, inp[:, 1:], torch.ones(2, 4, dtype=torch.bool),
                            chunk=3, vocab=20)
        ref = F.cross_entropy(model(input_ids=inp[:, :-1]).logits.reshape(-1, 20), inp[:, 1:].reshape(-1),
                              reduction="sum")
    torch.testing.assert_close(ce, ref, rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------


def _setup(tiny_data, teacher_dir, tmp_path, **over):
    cfg = config_from_dict(tiny_config(tmp_path / "run", tiny_data, teacher_dir, **over))
    pre = Preflight(cfg)
    capture = attn.ShdCapture.from_config(cfg.distill, pre.pairs, pre.student_cfg.num_attention_heads)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32,
                                                   attn_implementation=attn.TEACHER_ATTN).eval()
    teacher.requires_grad_(False)
    student = build_student_module(cfg, pre.student_cfg, attn.STUDENT_ATTN)
    attn.attach_teacher(teacher, capture.chan)
    attn.attach_student(student, capture.chan)
    return cfg, pre, capture, teacher, student


def _batch(pre, B=2, T=32, pad_last=0):
    """A split batch; with ``pad_last`` the last row is right-padded (its length says so, the token
    ids there are ordinary ones: padding is never recognised by id)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, pre.vocab, (B, T + 1), generator=g)
    lengths = torch.full((B,), T + 1)
    lengths[-1] -= pad_last
    return split_tokens(tokens, lengths=lengths if pad_last else None)


def _rebuilt_qkv(model, layers, inp, mask):
    """q, k (after RoPE), v and W_O of the given layers, rebuilt from the layer inputs."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    mods = attn.attention_modules(model)
    seen, hooks = {}, []
    for l in layers:
        def hook(mod, args, kwargs, l=l):
            seen[l] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
        hooks.append(mods[l].register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=inp, attention_mask=mask)
    for h in hooks:
        h.remove()
    out = {}
    for l in layers:
        m, (h, (cos, sin)) = mods[l], seen[l]
        B, T, _ = h.shape
        shape = (B, T, -1, m.head_dim)
        q = m.q_proj(h).view(shape).transpose(1, 2)
        k = m.k_proj(h).view(shape).transpose(1, 2)
        v = m.v_proj(h).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out[l] = (q.detach(), k.detach(), v.detach(), m.o_proj.weight.detach())
    return out


def _reference_shd(cfg, pre, capture, teacher, student, inp, mask):
    """Mean over distilled layers of shd_loss_reference on maps rebuilt from the models."""
    pairs, chosen = pre.pairs, capture.chosen
    t = _rebuilt_qkv(teacher, sorted(set(pairs.values())), inp, mask)
    s = _rebuilt_qkv(student, sorted(pairs), inp, mask)
    per = {}
    for sl, tl in pairs.items():
        tq, tk, tv, wo = t[tl]
        d = cfg.distill
        if tl in chosen.static_weights:  # distill.mixing_weights=calibrated: the fixed W of the run
            w = chosen.static_weights[tl].to(tq.dtype).expand(tq.shape[0], -1, -1)
        else:
            w = squeeze_weights(tq, tk, tv, wo, pre.student_cfg.num_attention_heads, plan=d.plan,
                                objective=d.objective, attention_mask=mask, selection=d.selection,
                                selected=chosen.selected.get(tl))
        per[sl] = shd_loss_reference(s[sl][0], s[sl][1], tq, tk, w, tau=d.tau_shd, attention_mask=mask,
                                     merge=d.merge, sharpen=d.sharpen, divergence=d.shd_divergence)
    return per


def _engine_shd_matches_reference(cfg, pre, capture, teacher, student, inp, mask):
    """The SHD losses the engine's attention functions record for one batch, checked against
    `_reference_shd` on maps rebuilt from the models; returns them."""
    with capture.micro_batch(mask) as state:
        with torch.no_grad():
            teacher(input_ids=inp, attention_mask=mask)
        assert set(state.captures) == set(pre.pairs.values()) and not state.pending  # only distilled teacher layers
        student(input_ids=inp, attention_mask=mask)
        got = {l: v.detach() for l, v in state.losses.items()}
    ref = _reference_shd(cfg, pre, capture, teacher, student, inp, mask)
    for l in ref:
        # atol: a row's KL is a difference of terms of size ~ the entropy (log T ~ 3.5) summed in fp32,
        # so ~1e-7 * 3.5 per row of absolute error is expected (seen: 1.2e-7 with transformers 5.25)
        torch.testing.assert_close(got[l], ref[l], rtol=1e-5, atol=1e-6)
    return got


@pytest.mark.parametrize("heads, kv, plan, objective, pad, variant", [
    (3, 3, "pairwise", "output", 0, {}),
    (3, 1, "group", "per_head", 5, {}),
    (4, 2, "mean", "output", 0, {}),
    (4, 4, "select", "output", 3, {}),
    (3, 1, "pairwise", "output", 4, {"distill.selection": "hard", "distill.merge": "logit", "distill.sharpen": 0.5}),
    (4, 2, "pairwise", "output", 3, {"distill.shd_divergence": "reverse"}),
    (4, 4, "select", "output", 0, {"distill.shd_divergence": "reverse"}),
    (2, 2, "select", "output", 2, {"distill.select_heads": "random", "distill.select_seed": 3}),
])
def test_shd_in_engine_equals_reference_on_rebuilt_maps(tiny_data, tiny_teacher, tmp_path, heads, kv, plan,
                                                         objective, pad, variant):
    cfg, pre, capture, teacher, student = _setup(
        tiny_data, tiny_teacher, tmp_path, **{"student.num_heads": heads, "student.num_kv_heads": kv,
                                              "distill.plan": plan, "distill.objective": objective,
                                              "distill.layer_map": [0, 2], "distill.tau_shd": 1.5, **variant})
    assert pre.pairs == {0: 0, 1: 2}
    batch = _batch(pre, pad_last=pad)
    inp, mask = batch.input_ids, batch.mask
    assert (mask is not None) == bool(pad)
    got = _engine_shd_matches_reference(cfg, pre, capture, teacher, student, inp, mask)
    assert all(v > 0 for v in got.values())


def test_shd_weight_ramps_linearly_over_the_warmup_steps(tiny_data, tiny_teacher, tmp_path):
    """distill.shd_warmup_steps = S: step s's total uses w_shd * min(1, s / S) on the same SHD term
    (logged unweighted as loss/shd); outside the loop (no step) the full weight."""
    cfg, pre, capture, teacher, student = _setup(tiny_data, tiny_teacher, tmp_path,
                                                 **{"distill.w_shd": 2.0, "distill.shd_warmup_steps": 4})
    obj = DistillObjective(cfg, pre.vocab, capture)
    assert [obj.shd_weight(s) for s in (1, 2, 3, 4, 9, None)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    batch = _batch(pre, pad_last=3)
    step_totals = StepTotals(tokens=float(batch.valid.sum()), rows=float(batch.mask.sum()))
    d, totals = cfg.distill, {}
    for step in (1, 3, 4):
        with torch.no_grad(), obj.micro_batch(student, teacher, batch, step_totals, step=step) as (loss, terms):
            pass
        rest = d.w_ce * terms["loss/ce"] + d.w_kd * d.tau_kd ** 2 * terms["loss/kd"]
        torch.testing.assert_close(loss, rest + obj.shd_weight(step) * terms["loss/shd"], rtol=1e-6, atol=1e-7)
        assert terms["loss/shd"] > 0
        totals[step] = loss
    assert totals[1] < totals[3] < totals[4]


def _calibration_pass(capture, pre, teacher, refusal: str):
    """A capture that needs calibration: the teacher forward is refused before the pass (``refusal``),
    then the pass over two batches (one padded). Returns (capture, batches, what the pass chose)."""
    assert capture.needs_calibration
    batches = [_batch(pre, pad_last=pad) for pad in (0, 5)]
    mask = batches[1].mask
    with capture.micro_batch(mask), pytest.raises(RuntimeError, match=refusal), torch.no_grad():
        teacher(input_ids=batches[1].input_ids, attention_mask=mask)
    chosen = capture.calibrate(lambda b: teacher(input_ids=b.input_ids, attention_mask=b.mask), batches,
                               lambda t: t)
    return capture, batches, chosen


@pytest.mark.parametrize("criterion", ["reconstruct", "contribution"])
def test_calibration_picks_the_least_cost_heads_and_the_loss_distils_them(tiny_data, tiny_teacher, tmp_path,
                                                                         criterion):
    """select_heads=reconstruct|contribution: no target before the calibration pass; the pass picks
    per group the head of least summed cost (costs recomputed here from rebuilt q, k, v); the SHD
    loss then equals the dense oracle's on those heads."""
    from pipeline.shd import squeeze_plan
    from pipeline.shd.selection import pick_heads, selection_costs

    cfg, pre, capture, teacher, student = _setup(
        tiny_data, tiny_teacher, tmp_path, **{"student.num_heads": 2, "student.num_kv_heads": 2,
                                              "distill.plan": "select", "distill.select_heads": criterion,
                                              "distill.layer_map": [0, 2]})
    chan = capture.chan
    assert not chan.chosen.selected
    capture, batches, chosen = _calibration_pass(capture, pre, teacher, "needs the calibration pass")
    inp, mask = batches[1].input_ids, batches[1].mask
    want = {}
    for layer in (0, 2):
        costs = sum(selection_costs(*_rebuilt_qkv(teacher, [layer], b.input_ids, b.mask)[layer], 2,
                                    criterion=criterion, attention_mask=b.mask) for b in batches)
        want[layer] = pick_heads(squeeze_plan(8, 2, "select"), costs)
    assert want == chan.chosen.selected and chan.calibration is None
    assert chosen == {"shd_selected_heads": {str(layer): list(heads) for layer, heads in want.items()}}
    assert "teacher head per student head (" + criterion in capture.describe()

    _engine_shd_matches_reference(cfg, pre, capture, teacher, student, inp, mask)


def test_calibrated_mixing_weights_are_solved_once_and_the_loss_uses_them(tiny_data, tiny_teacher, tmp_path):
    """distill.mixing_weights=calibrated: no target before the calibration pass; the pass gives the
    W of the merge rounds on the Gram tensors summed over its batches (recomputed here from rebuilt
    q, k, v), the same for every sequence; the SHD loss equals the dense oracle's with that W."""
    from pipeline.shd.calibrated import calibrated_weights, gram_statistics

    cfg, pre, capture, teacher, student = _setup(
        tiny_data, tiny_teacher, tmp_path, **{"student.num_heads": 3, "student.num_kv_heads": 3,
                                              "distill.plan": "pairwise", "distill.mixing_weights": "calibrated",
                                              "distill.layer_map": [0, 2]})
    chan = capture.chan
    assert not chan.chosen.static_weights
    capture, batches, chosen = _calibration_pass(capture, pre, teacher,
                                                 "mixing_weights=calibrated needs the calibration pass")
    inp, mask = batches[1].input_ids, batches[1].mask
    assert set(chosen) == {"shd_static_weights"} and chan.calibration is None
    for layer in (0, 2):
        stats = sum(gram_statistics(*_rebuilt_qkv(teacher, [layer], b.input_ids, b.mask)[layer], 3,
                                    plan="pairwise", attention_mask=b.mask) for b in batches)
        want = calibrated_weights(stats, 8, 3, plan="pairwise")
        torch.testing.assert_close(chan.chosen.static_weights[layer].double(), want, rtol=1e-5, atol=1e-6)
        assert chosen["shd_static_weights"][str(layer)] == chan.chosen.static_weights[layer].tolist()
    assert "calibrated mixing weights per student head" in capture.describe()

    _engine_shd_matches_reference(cfg, pre, capture, teacher, student, inp, mask)
    w = capture.last_weight_stats  # the logged statistics are those of the fixed W
    assert set(w) == {0, 2}
    # a resumed run takes the stored weights instead of calibrating
    fresh = attn.ShdCapture.from_config(cfg.distill, chan.pairs, 3)
    assert fresh.use_calibrated(chosen) and fresh.calibrated_state() == chosen
    assert not fresh.use_calibrated({"shd_selected_heads": {"0": [0, 3, 6]}})


def _objective_loss_and_grads(cfg, pre, capture, teacher, student, batch):
    obj = DistillObjective(cfg, pre.vocab, capture)
    n_rows = float(batch.mask.sum()) if batch.mask is not None else float(batch.input_ids.numel())
    with obj.micro_batch(student, teacher, batch, StepTotals(tokens=float(batch.valid.sum()), rows=n_rows)) as (
            loss, terms):
        student.zero_grad(set_to_none=True)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    return loss.detach(), terms, grads


def test_logged_loss_is_the_optimised_loss(tiny_data, tiny_teacher, tmp_path):
    """The objective's value equals an independent dense computation of the documented formula,
    and so does its gradient (what the optimizer applies)."""
    cfg, pre, capture, teacher, student = _setup(tiny_data, tiny_teacher, tmp_path,
                                                 **{"distill.w_kd": 0.7, "distill.w_shd": 2.0})
    batch = _batch(pre, pad_last=4)
    loss, terms, grads = _objective_loss_and_grads(cfg, pre, capture, teacher, student, batch)
    assert terms["loss/total"] == loss  # what is logged is the tensor that was backpropagated

    # independent dense reference: HF logits, F.cross_entropy, full softmaxes, shd_loss_reference
    d = cfg.distill
    inp, labels, valid, mask = batch.input_ids, batch.labels, batch.valid, batch.mask
    ref_student = copy.deepcopy(student)
    for m in attn.attention_modules(ref_student).values():
        m.shd_channel = None
    ref_student.config._attn_implementation = "sdpa"
    with torch.no_grad():
        tl = teacher(input_ids=inp, attention_mask=mask).logits
    sl = ref_student(input_ids=inp, attention_mask=mask).logits
    ce = F.cross_entropy(sl[valid], labels[valid])
    kd = F.kl_div(F.log_softmax(sl[valid] / d.tau_kd, -1), F.log_softmax(tl[valid] / d.tau_kd, -1),
                  log_target=True, reduction="sum") / valid.sum()
    shd_terms = _reference_shd_with_grad(cfg, pre, teacher, ref_student, inp, mask)
    ref = d.w_ce * ce + d.w_kd * d.tau_kd ** 2 * kd + d.w_shd * torch.stack(shd_terms).mean()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    ref.backward()
    for n, p in ref_student.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def _reference_shd_with_grad(cfg, pre, teacher, student, inp, mask):
    """Like _reference_shd but the student's q, k keep their graph (captured inside attention)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = {}

    def spy(module, q, k, v, m, **kw):
        seen[module.layer_idx] = (q, k)
        return sdpa_attention_forward(module, q, k, v, m, **kw)

    AttentionInterface.register("test_spy", spy)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionMaskInterface.register("test_spy", sdpa_mask)
    student.config._attn_implementation = "test_spy"
    student(input_ids=inp, attention_mask=mask)
    student.config._attn_implementation = "sdpa"
    t = _rebuilt_qkv(teacher, sorted(set(pre.pairs.values())), inp, mask)
    out = []
    for sl, tl in pre.pairs.items():
        tq, tk, tv, wo = t[tl]
        w = squeeze_weights(tq, tk, tv, wo, pre.student_cfg.num_attention_heads, plan=cfg.distill.plan,
                            objective=cfg.distill.objective, attention_mask=mask)
        out.append(shd_loss_reference(*seen[sl], tq, tk, w, tau=cfg.distill.tau_shd, attention_mask=mask))
    return out


def test_activation_checkpointing_same_loss_and_grads(tiny_data, tiny_teacher, tmp_path, monkeypatch):
    """Same loss and gradients with and without checkpointing, and the SHD pass runs once per
    distilled layer either way (the recomputation in backward does not repeat it)."""
    import pipeline.shd.loss as shd_loss_module

    passes = []
    blockwise = shd_loss_module._blockwise
    monkeypatch.setattr(shd_loss_module, "_blockwise", lambda *a, **k: passes.append(1) or blockwise(*a, **k))
    results = []
    for ac in (False, True):
        cfg, pre, capture, teacher, student = _setup(tiny_data, tiny_teacher, tmp_path / str(ac),
                                                     **{"student.activation_checkpointing": ac})
        assert student.model.layers[0].gradient_checkpointing is ac
        passes.clear()
        results.append(_objective_loss_and_grads(cfg, pre, capture, teacher, student, _batch(pre)))
        assert len(passes) == len(capture.pairs), (ac, len(passes))
    (l0, t0, g0), (l1, t1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-7)
    for k in t0:
        torch.testing.assert_close(t1[k], t0[k], rtol=0, atol=1e-7)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-8, msg=n)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher_kw, over, fragment", [
    ({"vocab_delta": 8}, {}, "distill.allow_padded_vocab=true"),
    ({"vocab_delta": -8}, {}, "smaller than the tokenizer's"),
    ({"heads": 2, "kv_heads": 2}, {}, "SHD needs student heads <= teacher heads"),
    ({"max_pos": 16}, {}, "exceeds the teacher's max_position_embeddings (16)"),
    ({}, {"distill.layer_map": [0, 9]}, "distill.layer_map entries [9] are out of range"),
    ({}, {"distill.layer_map": [0]}, "give one teacher layer per student layer"),
    ({}, {"distill.student_layers": [5]}, "distill.student_layers entries [5] are out of range"),
    ({}, {"student.vocab_size": 500}, "student vocab size (500) differs from the tokenizer's"),
])
def test_incompatible_models_fail_before_compute(tiny_data, tmp_path, teacher_kw, over, fragment):
    from transformers import LlamaConfig

    from pipeline.data.reader import read_manifest

    vocab = read_manifest(tiny_data[1]).tokenizer.vocab_size
    heads = teacher_kw.get("heads", 8)
    tc = LlamaConfig(vocab_size=vocab + teacher_kw.get("vocab_delta", 0), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=4, num_attention_heads=heads, num_key_value_heads=teacher_kw.get("kv_heads", 4),
                     max_position_embeddings=teacher_kw.get("max_pos", 256))
    tc.save_pretrained(tmp_path / "teacher")  # config only: preflight reads no weights
    cfg = config_from_dict(tiny_config(tmp_path / "run", tiny_data, tmp_path / "teacher", **over))
    with pytest.raises(ConfigError) as e:
        Preflight(cfg)
    assert fragment in str(e.value)


def test_tokenizer_mismatch_fails(tiny_data, tiny_teacher, tmp_path):
    from tests.data_fixtures import make_tokenizer, tiny_documents

    other = make_tokenizer(tmp_path, tiny_documents(120, seed=3), vocab_size=400)
    cfg = config_from_dict(tiny_config(tmp_path / "run", tiny_data, tiny_teacher,
                                       **{"data.tokenizer_dir": str(other)}))
    with pytest.raises(ConfigError, match="does not match the tokenizer the data"):
        Preflight(cfg)


@pytest.mark.parametrize("field", ["teacher.path", "student.init_from"])
def test_model_trained_with_another_tokenizer_fails(tiny_data, tiny_teacher, tmp_path, field):
    """Same vocabulary size, another tokenizer: only the recorded tokenizer can tell them apart."""
    import shutil

    from pipeline.data.reader import read_manifest
    from shd_common.manifest import TOKENIZER_FILES
    from tests.data_fixtures import make_tokenizer, tiny_documents

    vocab = read_manifest(tiny_data[1]).tokenizer.vocab_size
    other = make_tokenizer(tmp_path, tiny_documents(120, seed=3), vocab_size=vocab)
    model = tmp_path / "model"
    shutil.copytree(tiny_teacher, model)

    def preflight(tokenizer, **over):
        for name in TOKENIZER_FILES:
            (model / name).unlink(missing_ok=True)
            if (tokenizer / name).is_file():
                shutil.copy2(tokenizer / name, model / name)
        return Preflight(config_from_dict(tiny_config(tmp_path / "run", tiny_data, tiny_teacher,
                                                      **{field: str(model)}, **over)))

    with pytest.raises(ConfigError, match=f"{field} .* was trained with tokenizer sha256 .* data.check_model_tok"):
        preflight(other)
    preflight(other, **{"data.check_model_tokenizers": False})  # the user vouches for the ids
    preflight(tiny_data[0])  # the data's own tokenizer


@pytest.mark.parametrize("warmup", [0, 3])
def test_lr_schedule_warms_up_linearly_then_follows_the_cosine_to_min_lr(tiny_data, tiny_teacher, tmp_path, warmup):
    import math

    cfg = config_from_dict(tiny_config(tmp_path / "run", tiny_data, tiny_teacher, **{
        "optim.lr": 1e-3, "optim.min_lr": 1e-4, "optim.warmup_steps": warmup, "optim.max_steps": 13}))
    lr = [1e-3 * lr_lambda(cfg)(s) for s in range(16)]
    assert lr[:warmup] == pytest.approx([1e-3 * (s + 1) / warmup for s in range(warmup)])
    assert lr[warmup] == pytest.approx(1e-3)  # the peak, the first step after warm-up
    mid = warmup + (13 - warmup) / 2
    if mid.is_integer():
        assert lr[int(mid)] == pytest.approx(0.55e-3)  # half way down the cosine: (lr + min_lr) / 2
    assert all(a > b for a, b in zip(lr[warmup:13], lr[warmup + 1:14]))
    assert lr[13:] == pytest.approx([1e-4] * 3)  # min_lr from max_steps on (never below)
    cos = [1e-4 + 0.45e-3 * (1 + math.cos(math.pi * (s - warmup) / (13 - warmup))) for s in range(warmup, 14)]
    assert lr[warmup:14] == pytest.approx(cos)
