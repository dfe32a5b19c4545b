"""Teacher (and student) architectures: SHD's maps are the model's own maps, or the model is refused.

The oracle is the model itself: for every family in `pipeline.models.architectures.SUPPORTED`, a tiny
random model built from transformers' config class and saved with save_pretrained is run with
attn_implementation="eager" and output_attentions=True; the maps SHD recomputes from the queries
and keys its attention function captured (with the module's own scale and sliding window) must
equal those maps on every valid row of a batch with right and left padding, and so must the
streaming loss's targets and the squeeze weights computed from them. In float32 at 1e-5 (the
weights, an argmin, at 1e-4).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, DistillConfig, config_from_dict
from pipeline.loss import capture as attn
from pipeline.models import architectures
from pipeline.shd import MapSpec, attention_maps, shd_loss, squeeze_plan
from pipeline.shd.reference import weights_from_maps
from pipeline.training.builders import build_student_module
from pipeline.training.preflight import Preflight
from tests.helpers import tiny_config

attn.register()  # the shd_teacher / shd_student attention functions, for models built here

VOCAB = 96
LENGTH = 24


def _config(name: str, vocab: int, **over):
    """A tiny config of a family, with the feature that distinguishes it from LLaMA switched on;
    `over` replaces fields (passed to the config class, so derived fields such as layer_types follow)."""
    from transformers import GraniteConfig, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, use_cache=False,
                  initializer_range=0.2)  # sharp enough maps that a wrong scale or window shows
    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8}
    config_class, features = {
        "llama3_rope_tied": (LlamaConfig, dict(rope_scaling=llama3_rope, rope_theta=5e5, tie_word_embeddings=True)),
        "mistral_window": (MistralConfig, dict(sliding_window=7)),
        "mistral_no_window": (MistralConfig, dict(sliding_window=None)),
        "mixtral_window": (MixtralConfig, dict(sliding_window=5, num_local_experts=2, num_experts_per_tok=1)),
        "qwen2_bias_window": (Qwen2Config, dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
        "qwen3_qk_norm": (Qwen3Config, dict(head_dim=12)),
        "granite_multiplier": (GraniteConfig, dict(attention_multiplier=0.4)),
    }[name]
    return config_class(**{**common, **features, **over})


FAMILIES = ["llama3_rope_tied", "mistral_window", "mistral_no_window", "mixtral_window", "qwen2_bias_window",
            "qwen3_qk_norm", "granite_multiplier"]


def save_model(name: str, out, vocab: int = VOCAB, seed: int = 0, **over):
    """A random model of the family saved with save_pretrained; returns (directory, config)."""
    from transformers import AutoModelForCausalLM

    cfg = _config(name, vocab, **over)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # RMS norm weights start at one: randomise them so q/k norms matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    return out, cfg


def _batch(vocab: int, length: int = LENGTH):
    """Tokens [3, T] and a mask with a full, a right-padded and a left-padded sequence."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, vocab, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, -5:] = 0
    mask[2, :4] = 0
    return tokens, mask


def _load(path, impl: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl).eval()
    model.requires_grad_(False)
    return model


def _row_kl(target, log_student, rows):
    """sum over valid rows and heads of KL(target || student), target 0 log 0 = 0 (eager's padding
    rows, which may be NaN, are left out)."""
    kl = (torch.xlogy(target, target) - target * log_student.clamp_min(torch.finfo(log_student.dtype).min)).sum(-1)
    return torch.where(rows.bool()[:, None], kl, 0.0).sum()


@pytest.mark.parametrize("family", FAMILIES)
def test_shd_maps_targets_and_weights_are_the_models_own(family, tmp_path):
    path, cfg = save_model(family, tmp_path / family)
    tokens, mask = _batch(VOCAB)
    rows = mask.bool()
    # float32: in float64, eager adds float64's lowest value and softmaxes in float32 (-inf), so a
    # left-padded sequence's padding rows turn NaN and spread to later layers
    dtype = torch.float32
    eager = _load(path, "eager", dtype)(input_ids=tokens, attention_mask=mask, output_attentions=True).attentions

    teacher = _load(path, attn.TEACHER_ATTN, dtype)
    layers = list(range(cfg.num_hidden_layers))
    heads = cfg.num_attention_heads
    capture = attn.ShdCapture.from_config(DistillConfig(plan="pairwise"), {l: l for l in layers}, heads // 2)
    attn.attach_teacher(teacher, capture.chan)
    values = {}
    mods = attn.attention_modules(teacher)
    for l in layers:  # the value heads, for the weights oracle
        mods[l].v_proj.register_forward_hook(lambda m, a, out, l=l: values.__setitem__(l, out))
    with capture.micro_batch(mask) as state, torch.no_grad():
        teacher(input_ids=tokens, attention_mask=mask)
    assert set(state.captures) == set(layers)

    g = torch.Generator().manual_seed(3)
    for l in layers:
        q, k, w, spec = state.captures[l]
        q, k = q.double(), k.double()
        # the spec is the module's: its scaling, and the window transformers' config gives the layer
        assert spec == MapSpec(scale=mods[l].scaling, window=architectures.layer_window(cfg, l))
        real = rows[:, None, :].expand(-1, heads, -1)  # valid query rows (eager's padding rows differ)
        torch.testing.assert_close(attention_maps(q, k, mask, spec=spec)[real], eager[l][real].double(),
                                   rtol=0, atol=1e-5)
        if spec.window_for(LENGTH) is not None or abs(spec.scale_for(q.shape[-1]) - q.shape[-1] ** -0.5) > 1e-12:
            # the test can tell: the default map (1/sqrt(d), no window) is not this family's
            assert (attention_maps(q, k, mask)[real] - eager[l][real]).abs().amax() > 1e-2

        # the streaming loss's targets (identity weights: every teacher head is a target)
        student_q = torch.randn(3, heads, LENGTH, 5, generator=g, dtype=torch.float64)
        student_k = torch.randn(3, heads, LENGTH, 5, generator=g, dtype=torch.float64)
        identity = torch.eye(heads, dtype=torch.float64).expand(3, -1, -1)
        got = shd_loss(student_q, student_k, q, k, identity, attention_mask=mask, block_size=5, teacher_spec=spec)
        student_maps = attention_maps(student_q, student_k, mask)
        want = _row_kl(eager[l].double(), student_maps.log(), rows) / (heads * rows.sum())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

        # the squeeze weights the hook computed equal the literal ones from the eager maps
        v = values[l].view(3, LENGTH, -1, q.shape[-1]).transpose(1, 2)
        literal = weights_from_maps(eager[l].double().nan_to_num(), v.double(), mods[l].o_proj.weight.double(),
                                    heads // 2, plan="pairwise", attention_mask=mask)
        torch.testing.assert_close(w.double(), literal, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_kd_rebuilds_the_models_own_logits_from_its_head_input(family, tmp_path):
    """Logit KD never holds a teacher's [B, T, V] logits: it rebuilds them chunk by chunk from the
    head's input and weight. That must give the model's own logits (granite's logits_scaling included)."""
    from pipeline.loss import lm_head

    path, cfg = save_model(family, tmp_path / family)
    teacher = _load(path, "sdpa")
    tokens, mask = _batch(VOCAB)
    with torch.no_grad():
        want = teacher(input_ids=tokens, attention_mask=mask).logits.reshape(-1, VOCAB)
        rows = lm_head.teacher_rows(teacher, tokens, mask, keep_logits=True)
        assert rows.logits is None and rows.hidden.shape == (want.shape[0], cfg.hidden_size)
        torch.testing.assert_close(rows.rows(0, want.shape[0], VOCAB), want, rtol=1e-5, atol=1e-5)
        assert lm_head.teacher_rows(teacher, tokens, mask, keep_logits=False) is None


def test_tied_embeddings_and_llama3_rope_survive_save_and_load(tmp_path):
    path, cfg = save_model("llama3_rope_tied", tmp_path / "m")
    model = _load(path, "sdpa", torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.rope_parameters["rope_type"] == "llama3"


# ----------------------------------------------------------------------------------------------
# The engine's SHD term on real teachers: equal to KL(teacher eager maps || student eager maps)
# ----------------------------------------------------------------------------------------------


def _engine_pieces(tiny_data, teacher_dir, tmp_path, **over):
    cfg = config_from_dict(tiny_config(tmp_path / "run", tiny_data, teacher_dir, **over))
    pre = Preflight(cfg)
    architectures.check_distillable("teacher", pre.teacher_cfg)
    architectures.check_distillable("student", pre.student_cfg)
    architectures.check_windows(pre.student_cfg, pre.teacher_cfg, pre.pairs, cfg.data.seq_len)
    capture = attn.ShdCapture.from_config(cfg.distill, pre.pairs, pre.student_cfg.num_attention_heads)
    teacher = _load(teacher_dir, attn.TEACHER_ATTN, torch.float32)
    student = build_student_module(cfg, pre.student_cfg, attn.STUDENT_ATTN)
    attn.attach_teacher(teacher, capture.chan)
    attn.attach_student(student, capture.chan)
    return cfg, pre, capture, teacher, student


def _eager_attentions(model, tokens, mask):
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    for m in attn.attention_modules(eager).values():
        m.shd_channel = None
    with torch.no_grad():
        return eager(input_ids=tokens, attention_mask=mask, output_attentions=True).attentions


@pytest.mark.parametrize("teacher_family, student_family", [
    ("mistral_window", None),  # the reported failure: window 16 at seq_len 64, plan select
    ("mistral_window", "qwen2_bias_window"),  # student.init_from a Qwen2 directory, window 32 on its layer 1
    ("qwen3_qk_norm", None),  # q/k norms and head_dim != hidden / heads
])
def test_engine_shd_loss_is_the_kl_of_the_models_eager_maps(tiny_data, tmp_path, teacher_family, student_family):
    from pipeline.data.reader import Batch, read_manifest
    from pipeline.loss.objective import DistillObjective, StepTotals

    vocab = read_manifest(tiny_data[1]).tokenizer.vocab_size
    length = 64
    teacher_dir, _ = save_model(teacher_family, tmp_path / "teacher", vocab, num_attention_heads=8,
                                num_key_value_heads=4, num_hidden_layers=4, hidden_size=64,
                                **({"sliding_window": 16} if teacher_family == "mistral_window" else {}))
    # one sample, only the SHD term, plan select: the configuration of the reported failure
    over = {"data.seq_len": length, "data.micro_batch_size": 1, "distill.plan": "select", "distill.w_ce": 0.0,
            "distill.w_kd": 0.0, "distill.w_shd": 1.0, "distill.shd_block_size": 8}
    if student_family:
        student_dir, _ = save_model(student_family, tmp_path / "student", vocab, num_attention_heads=4,
                                    num_key_value_heads=2, sliding_window=32, seed=5)
        over["student.init_from"] = str(student_dir)
    cfg, pre, capture, teacher, student = _engine_pieces(tiny_data, teacher_dir, tmp_path, **over)
    if student_family:
        assert type(student).__name__ == "Qwen2ForCausalLM"
        assert student.model.layers[0].self_attn.q_proj.bias is not None
        assert [architectures.layer_window(pre.student_cfg, l) for l in range(2)] == [None, 32]
    tokens = torch.randint(4, vocab, (1, length), generator=torch.Generator().manual_seed(4))
    inp, labels = tokens, tokens
    valid = torch.ones_like(tokens, dtype=torch.bool)
    with DistillObjective(cfg, vocab, capture).micro_batch(student, teacher, Batch(inp, labels, valid, mask=None),
                                                           StepTotals(float(length), float(length))) as (loss, terms):
        pass

    # the oracle: both models' own eager maps; "select" takes the first teacher head of each group
    teacher_maps = _eager_attentions(teacher, inp, None)
    student_maps = _eager_attentions(student, inp, None)
    n = pre.student_cfg.num_attention_heads
    first = [g[0] for g in squeeze_plan(pre.teacher_cfg.num_attention_heads, n, "select").groups]
    rows = torch.ones(1, length)
    kls = [_row_kl(teacher_maps[t][:, first].double(), student_maps[s].double().log(), rows) / (n * length)
           for s, t in pre.pairs.items()]
    want = torch.stack(kls).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss/shd"].double(), want, rtol=1e-5, atol=1e-6)
    if teacher_family == "mistral_window":  # what the targets gave when they ignored the window
        ignored = []
        for s, t in pre.pairs.items():
            q, k = _captured_qk(teacher, t, inp)
            full = attention_maps(q, k)[:, first]
            ignored.append(_row_kl(full, student_maps[s].double().log(), rows) / (n * length))
        assert abs(torch.stack(ignored).mean() - want) > 0.1


def _captured_qk(teacher, layer, inp):
    """The teacher layer's q, k as the attention function receives them (float64)."""
    capture = attn.ShdCapture.from_config(DistillConfig(plan="select"), {0: layer}, 1)
    handles = attn.attach_teacher(teacher, capture.chan)
    with capture.micro_batch(None) as state, torch.no_grad():
        teacher(input_ids=inp)
    q, k, _, _ = state.captures[layer]
    for h in handles:
        h.remove()
    return q.double(), k.double()


# ----------------------------------------------------------------------------------------------
# Refusals before any model loads, and what runs without SHD
# ----------------------------------------------------------------------------------------------


def test_gemma2_is_refused_for_shd_from_its_config_and_runs_logit_kd_in_eager(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma2Config

    from pipeline.loss import lm_head
    from pipeline.loss.ce_kd import ce_kd_sums_reference, head_ce_kd

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gemma2")
    loaded_cfg = AutoConfig.from_pretrained(tmp_path / "gemma2")  # what Preflight reads: config only
    with pytest.raises(ConfigError) as e:
        architectures.check_distillable("teacher", loaded_cfg)
    msg = str(e.value)
    assert "soft-capping" in msg and "query_pre_attn_scalar" in msg and "distill.w_shd=0" in msg

    # w_shd=0: logit KD only. transformers refuses Gemma 2 under SDPA, so it runs in eager
    assert architectures.plain_attn_implementation(loaded_cfg) == "eager"
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        _load(tmp_path / "gemma2", "sdpa", torch.float32)
    teacher = _load(tmp_path / "gemma2", architectures.plain_attn_implementation(loaded_cfg), torch.float32)
    tokens, mask = _batch(VOCAB, 12)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=tokens, attention_mask=mask).logits
    # its logits are soft-capped after the head, so KD takes them in full, not from the head's input
    assert not lm_head.passes_hidden(teacher)
    with torch.no_grad():
        rows = lm_head.teacher_rows(teacher, tokens, mask, keep_logits=True)
    hidden, weight = torch.randn(3, 12, 16, requires_grad=True), torch.randn(VOCAB, 16, requires_grad=True)
    valid = mask.bool()
    _, _, got = head_ce_kd(hidden, weight, tokens, valid, rows, tau=2.0, chunk=7)
    _, want = ce_kd_sums_reference(hidden @ weight.T, tokens, valid, teacher_logits, tau=2.0)
    assert torch.isfinite(got) and got > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # and the attention function's last line of defence, should such a teacher reach it anyway
    shd = _load(tmp_path / "gemma2", attn.TEACHER_ATTN, torch.float32)
    capture = attn.ShdCapture.from_config(DistillConfig(plan="pairwise"), {0: 0}, 2)
    attn.attach_teacher(shd, capture.chan)
    with capture.micro_batch(None), pytest.raises(RuntimeError, match="softcap"):
        shd(input_ids=tokens)


def _unsupported_config(kind: str):
    """Configs SHD must refuse: an unlisted family, a listed-as-refused one, a map-changing field."""
    from transformers import LlamaConfig, OlmoConfig, Phi3Config

    if kind == "unlisted":
        return OlmoConfig()
    if kind == "fused_qkv":
        return Phi3Config()
    cfg = LlamaConfig()
    cfg.attn_logit_softcapping = 30.0
    return cfg


@pytest.mark.parametrize("kind, fragment", [
    ("unlisted", "model_type 'olmo' is not in SHD's table"),
    ("fused_qkv", "fused qkv_proj"),
    ("softcapped_llama", "attention logit soft-capping (attn_logit_softcapping=30.0)"),
])
def test_unsupported_attention_is_refused_naming_the_feature_and_the_fix(kind, fragment):
    with pytest.raises(ConfigError) as e:
        architectures.check_distillable("teacher", _unsupported_config(kind))
    assert fragment in str(e.value) and "distill.w_shd=0" in str(e.value)


def test_every_supported_family_is_exercised_and_passes_the_table_check():
    tested = {_config(name, VOCAB).model_type for name in FAMILIES}
    assert tested == set(architectures.SUPPORTED)
    for name in FAMILIES:
        architectures.check_distillable("teacher", _config(name, VOCAB))


def test_a_student_window_narrower_than_its_teacher_layer_is_refused():
    mistral = _config("mistral_window", VOCAB)  # window 7 everywhere
    qwen2 = _config("qwen2_bias_window", VOCAB)  # window 6 on layer 1 only
    llama = _config("llama3_rope_tied", VOCAB)
    architectures.check_windows(llama, mistral, {0: 0, 1: 1}, seq_len=64)  # no student window: fine
    architectures.check_windows(qwen2, llama, {0: 0}, seq_len=64)  # student layer 0 has no window
    architectures.check_windows(qwen2, llama, {0: 0, 1: 1}, seq_len=6)  # a window >= seq_len is none
    with pytest.raises(ConfigError, match="student layer 1 has a sliding window of 6 tokens but its teacher layer 0 "
                                          "has 7"):
        architectures.check_windows(qwen2, mistral, {1: 0}, seq_len=64)
    with pytest.raises(ConfigError, match="teacher layer 1 has none"):
        architectures.check_windows(qwen2, llama, {1: 1}, seq_len=64)


# ----------------------------------------------------------------------------------------------
# A teacher whose vocabulary is padded beyond the tokenizer
# ----------------------------------------------------------------------------------------------


def test_padded_teacher_vocab_is_distilled_on_the_shared_vocab(tiny_data, tmp_path):
    from pipeline.data.reader import read_manifest, split_tokens
    from pipeline.loss.objective import DistillObjective, StepTotals

    vocab = read_manifest(tiny_data[1]).tokenizer.vocab_size
    teacher_dir, _ = save_model("llama3_rope_tied", tmp_path / "teacher", vocab + 8)  # 8 padding rows
    over = {"distill.w_shd": 0.0, "distill.w_ce": 0.0, "distill.w_kd": 1.0, "distill.tau_kd": 2.0}
    with pytest.raises(ConfigError, match="distill.allow_padded_vocab=true"):
        Preflight(config_from_dict(tiny_config(tmp_path / "refused", tiny_data, teacher_dir, **over)))
    cfg = config_from_dict(tiny_config(tmp_path / "run", tiny_data, teacher_dir,
                                       **over, **{"distill.allow_padded_vocab": True}))
    pre = Preflight(cfg)
    teacher = _load(teacher_dir, "sdpa", torch.float32)
    assert teacher.model.embed_tokens.weight.shape[0] == vocab + 8
    student = build_student_module(cfg, pre.student_cfg, "sdpa")
    tokens = torch.randint(4, vocab, (2, 17), generator=torch.Generator().manual_seed(5))
    batch = split_tokens(tokens)
    inp, valid = batch.input_ids, batch.valid
    with DistillObjective(cfg, pre.vocab, None).micro_batch(student, teacher, batch,
                                                            StepTotals(float(valid.sum()), float(inp.numel()))) as (
            loss, terms):
        pass
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inp).logits
        student_logits = student(input_ids=inp).logits
    assert teacher_logits[..., vocab:].abs().amax() > 0  # the padding rows do produce logits
    log_p = F.log_softmax(teacher_logits[..., :vocab] / 2.0, -1)  # renormalised over the shared vocab
    log_q = F.log_softmax(student_logits / 2.0, -1)
    want = (log_p.exp() * (log_p - log_q)).sum(-1)[valid].mean()
    torch.testing.assert_close(terms["loss/kd"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, 4.0 * want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
