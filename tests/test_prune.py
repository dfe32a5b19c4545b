"""`python -m pipeline.prune`: a student cut from its teacher changes exactly what was pruned.

Oracles are the teachers themselves (tiny random models of each family, saved with save_pretrained):
nothing pruned gives the teacher's logits; a pruned head gives the teacher's logits with that
head's o_proj input columns zeroed, and each kept head's attention probabilities are its source
head's (eager attention, output_attentions); a pruned depth keeps the chosen teacher layers, in
order, weight for weight; every axis at once gives the record's slices of the teacher's tensors.
Bad options are refused before any weight loads, naming the flag. The command runs in-process
(main(argv)); tests/test_prune_real.py runs it as `python -m pipeline.prune` on a real teacher.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.data.reader import PackedSampleReader
from pipeline.models.identity import teacher_identity
from pipeline.prune import main
from pipeline.pruning.choice import choose, top_indices
from pipeline.pruning.importance import Importance
from pipeline.pruning.record import head_sources, layer_sources, read_record
from pipeline.pruning.shape import StudentShape
from shd_common.manifest import TOKENIZER_FILES
from tests.test_teachers import save_model

VOCAB = 400  # the tiny corpus's tokenizer (tests/data_fixtures.make_tiny_corpus_shards)
TOKENS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))


def _prune(teacher: Path, data: Path, out: Path, *options) -> int:
    """The command in-process, with a small calibration (2 batches of 2 x 16 tokens)."""
    return main(["--teacher", str(teacher), "--data", str(data), "--out", str(out), "--calibration-batches", "2",
                 "--batch-size", "2", "--seq-len", "16", *map(str, options)])


def _load(path: Path, impl: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    return model.eval().requires_grad_(False)


def _logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=TOKENS, **kw)


def _zero_heads(model, kept: list[list[int]]):
    """A copy of `model` whose dropped query heads (per layer: those not in `kept`) add nothing:
    their o_proj input columns are zero."""
    ref = copy.deepcopy(model)
    for layer, heads in zip(ref.model.layers, kept):
        d = layer.self_attn.head_dim
        for h in set(range(ref.config.num_attention_heads)) - set(heads):
            layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0.0
    return ref


# ----------------------------------------------------------------------------------------------
# (a) nothing pruned, every family
# ----------------------------------------------------------------------------------------------

FAMILIES = ["llama3_rope_tied", "qwen2_bias_window", "mistral_window", "qwen3_qk_norm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_pruned_gives_the_teachers_logits_and_records_the_identities(family, tiny_data, tmp_path):
    teacher, _ = save_model(family, tmp_path / "teacher", vocab=VOCAB, num_hidden_layers=3)
    student = tmp_path / "student"
    assert _prune(teacher, tiny_data[1], student) == 0
    t, s = _load(teacher), _load(student)
    # the teacher's config but for where it was loaded from and head_dim, which the student states
    same = {"_name_or_path": None, "head_dim": None}
    assert type(s) is type(t) and s.config.to_dict() | same == t.config.to_dict() | same
    assert s.config.head_dim == t.model.layers[0].self_attn.head_dim
    torch.testing.assert_close(_logits(s).logits, _logits(t).logits, rtol=0, atol=1e-6)

    record = read_record(student)
    assert layer_sources(record) == [0, 1, 2] and head_sources(record) == [[0, 1, 2, 3]] * 3
    assert record["teacher"]["content_sha256"] == teacher_identity(teacher)[0]["content_sha256"]
    reader = PackedSampleReader(tiny_data[1], seq_len=16)  # what a training run records of its data
    assert record["calibration"]["data_sha256"] == reader.state_dict()["data_sha256"]
    assert record["calibration"]["tokenizer_sha256"] == reader.manifest.tokenizer.files_sha256
    assert record["calibration"]["tokens"] == 2 * 2 * 16
    assert record["options"] == dict.fromkeys(["layers", "heads", "kv_heads", "intermediate_size", "hidden_size"])


# ----------------------------------------------------------------------------------------------
# every axis at once: the student's tensors are the record's slices of the teacher's
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_axis_pruned_gives_the_records_slices_of_the_teachers_tensors(family, tiny_data, tmp_path):
    teacher, cfg = save_model(family, tmp_path / "teacher", vocab=VOCAB, num_hidden_layers=3)
    student = tmp_path / "student"
    assert _prune(teacher, tiny_data[1], student, "--layers", 2, "--heads", 2, "--kv-heads", 1,
                  "--intermediate-size", 20, "--hidden-size", 16) == 0
    t, s = _load(teacher), _load(student)
    sc = s.config
    d = t.model.layers[0].self_attn.head_dim
    assert (sc.num_hidden_layers, sc.num_attention_heads, sc.num_key_value_heads, sc.intermediate_size,
            sc.hidden_size, s.model.layers[0].self_attn.head_dim) == (2, 2, 1, 20, 16, d)
    assert sc.tie_word_embeddings == cfg.tie_word_embeddings
    if cfg.tie_word_embeddings:
        assert s.lm_head.weight.data_ptr() == s.model.embed_tokens.weight.data_ptr()

    record = read_record(student)
    c = torch.tensor(record["hidden_channels"]["indices"])
    assert record["hidden_channels"]["kept"] == len(c) == 16
    torch.testing.assert_close(s.model.embed_tokens.weight, t.model.embed_tokens.weight[:, c], rtol=0, atol=0)
    torch.testing.assert_close(s.lm_head.weight, t.lm_head.weight[:, c], rtol=0, atol=0)
    torch.testing.assert_close(s.model.norm.weight, t.model.norm.weight[c], rtol=0, atol=0)
    for j, entry in enumerate(record["layers"]):
        sl, tl = s.model.layers[j], t.model.layers[entry["teacher_layer"]]
        q = torch.cat([torch.arange(h["teacher_head"] * d, (h["teacher_head"] + 1) * d) for h in entry["heads"]])
        kv = torch.cat([torch.arange(k["teacher_kv_head"] * d, (k["teacher_kv_head"] + 1) * d)
                        for k in entry["kv_heads"]])
        n = torch.tensor(entry["neurons"]["indices"])
        assert entry["neurons"]["kept"] == len(n) == 20
        assert [h["teacher_kv_head"] for h in entry["heads"]] == [h["teacher_head"] // 2 for h in entry["heads"]]
        assert {h["teacher_kv_head"] for h in entry["heads"]} == {entry["kv_heads"][0]["teacher_kv_head"]}
        pairs = {"self_attn.q_proj": (q, c), "self_attn.k_proj": (kv, c), "self_attn.v_proj": (kv, c),
                 "self_attn.o_proj": (c, q), "mlp.gate_proj": (n, c), "mlp.up_proj": (n, c),
                 "mlp.down_proj": (c, n)}
        for module, (rows, cols) in pairs.items():
            sm, tm = sl.get_submodule(module), tl.get_submodule(module)
            torch.testing.assert_close(sm.weight, tm.weight[rows][:, cols], rtol=0, atol=0)
            if tm.bias is not None:  # Qwen2's q/k/v biases
                torch.testing.assert_close(sm.bias, tm.bias[rows], rtol=0, atol=0)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            torch.testing.assert_close(sl.get_submodule(norm).weight, tl.get_submodule(norm).weight[c], rtol=0, atol=0)
        if hasattr(tl.self_attn, "q_norm"):  # Qwen3: per head_dim, untouched
            torch.testing.assert_close(sl.self_attn.q_norm.weight, tl.self_attn.q_norm.weight, rtol=0, atol=0)
    assert torch.isfinite(_logits(s).logits).all()


# ----------------------------------------------------------------------------------------------
# (b) one query head pruned: exactly that head's output is gone
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,over,options", [
    # MQA: one of the group's 4 heads (LLaMA's config wants hidden_size a multiple of the heads)
    ("llama3_rope_tied", {"num_key_value_heads": 1, "hidden_size": 48}, ["--heads", 3]),
    ("qwen2_bias_window", {"num_key_value_heads": 4}, ["--heads", 3, "--kv-heads", 3]),  # MHA: with its kv head
], ids=["llama_mqa", "qwen2_mha_bias"])
def test_pruning_one_query_head_equals_zeroing_its_o_proj_columns(family, over, options, tiny_data, tmp_path):
    teacher, _ = save_model(family, tmp_path / "teacher", vocab=VOCAB, **over)
    student = tmp_path / "student"
    assert _prune(teacher, tiny_data[1], student, *options) == 0
    kept = head_sources(read_record(student))
    assert all(len(heads) == 3 for heads in kept)
    t = _load(teacher)
    want = _logits(_zero_heads(t, kept)).logits
    got = _logits(_load(student)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert (got - _logits(t).logits).abs().amax() > 1e-3  # the pruned head mattered: the test can tell


# ----------------------------------------------------------------------------------------------
# (c) heads only: each student head attends as its source teacher head
# ----------------------------------------------------------------------------------------------


def test_heads_only_student_heads_attend_as_their_source_heads(tiny_data, tmp_path):
    teacher, _ = save_model("llama3_rope_tied", tmp_path / "teacher", vocab=VOCAB, hidden_size=64,
                            num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=3)
    student = tmp_path / "student"
    assert _prune(teacher, tiny_data[1], student, "--heads", 4, "--kv-heads", 2) == 0
    record = read_record(student)
    assert layer_sources(record) == [0, 1, 2]
    t, s = _load(teacher, "eager"), _load(student, "eager")
    kept = head_sources(record)
    got = _logits(s, output_attentions=True)
    ref = _logits(_zero_heads(t, kept), output_attentions=True)  # same residual stream as the student's
    first = _logits(t, output_attentions=True).attentions[0]
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=2e-6)
    for layer, entry in enumerate(record["layers"]):
        for head in entry["heads"]:
            n, h = head["student_head"], head["teacher_head"]
            assert head["teacher_kv_head"] == h // 2 and head["student_kv_head"] == n // 2
            torch.testing.assert_close(got.attentions[layer][:, n], ref.attentions[layer][:, h], rtol=0, atol=1e-6)
            if layer == 0:  # before any pruned head acts, the teacher's own maps
                torch.testing.assert_close(got.attentions[0][:, n], first[:, h], rtol=0, atol=1e-6)
    # distinct teacher heads attend differently, so a wrong source head would fail the comparison
    assert (first[:, 0] - first[:, 1]).abs().amax() > 1e-2


# ----------------------------------------------------------------------------------------------
# (d) depth: the chosen layers, in order, named by the record
# ----------------------------------------------------------------------------------------------


def test_layer_pruning_keeps_the_most_influential_layers_in_order(tiny_data, tmp_path):
    teacher, _ = save_model("qwen2_bias_window", tmp_path / "teacher", vocab=VOCAB, num_hidden_layers=4,
                            max_window_layers=2)  # layers 0-1 full attention, 2-3 sliding window
    student = tmp_path / "student"
    assert _prune(teacher, tiny_data[1], student, "--layers", 2) == 0
    record = read_record(student)
    influence = [entry["block_influence"] for entry in record["teacher_layers"]]
    chosen = layer_sources(record)
    assert chosen == sorted(sorted(range(4), key=lambda i: -influence[i])[:2])
    assert [entry["student_layer"] for entry in record["teacher_layers"]] == [
        chosen.index(i) if i in chosen else None for i in range(4)]

    t, s = _load(teacher), _load(student)
    assert s.config.layer_types == [t.config.layer_types[i] for i in chosen]
    teacher_state = t.state_dict()
    for name, tensor in s.state_dict().items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            parts[2] = str(chosen[int(parts[2])])
        torch.testing.assert_close(tensor, teacher_state[".".join(parts)], rtol=0, atol=0)
    # the same model as the teacher with the other layers removed
    t.model.layers = torch.nn.ModuleList(t.model.layers[i] for i in chosen)
    t.config.num_hidden_layers, t.config.layer_types = 2, s.config.layer_types
    torch.testing.assert_close(_logits(s).logits, _logits(t).logits, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# importance: Minitron's estimates, recomputed from the model's own outputs
# ----------------------------------------------------------------------------------------------


def test_calibrated_importance_is_minitrons_activation_statistics():
    """Two batches through the hooks give the means, over both batches' tokens, of: 1 - cos(layer
    input, layer output) (from output_hidden_states); ||A_h V_h|| (eager maps times the value
    heads); |act(gate(x)) * up(x)| at the MLP's input x; |RMSNorm output| summed over every layer's
    two norms and the final norm."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pipeline.pruning.importance import calibrate

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, use_cache=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:  # the final norm keeps weight 1: it does not turn the last output
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    batches = [TOKENS[:, :12], TOKENS[:, 8:]]
    got = calibrate(model, batches)

    values, mlp_in = {}, {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.v_proj.register_forward_hook(lambda m, a, out, i=i: values.setdefault(i, []).append(out))
        layer.mlp.register_forward_hook(lambda m, a, out, i=i: mlp_in.setdefault(i, []).append(a[0]))
    layers, heads, neurons, channels = [], [], [], 0.0
    with torch.no_grad():
        outs = [model.model(input_ids=b, output_hidden_states=True, output_attentions=True) for b in batches]
        for i, layer in enumerate(model.model.layers):
            cos = [torch.cosine_similarity(o.hidden_states[i], o.hidden_states[i + 1], dim=-1) for o in outs]
            layers.append(torch.cat([(1 - c).flatten() for c in cos]).mean())
            per_head = []
            for o, v in zip(outs, values[i]):
                v = v.view(*v.shape[:2], 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)  # [B, H, T, d]
                per_head.append((o.attentions[i] @ v).norm(dim=-1).transpose(1, 2).flatten(0, 1))  # [B*T, H]
            heads.append(torch.cat(per_head).mean(0))
            x = torch.cat([a.flatten(0, 1) for a in mlp_in[i]])
            neurons.append((layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)).abs().mean(0))
            normed = torch.cat([layer.input_layernorm(o.hidden_states[i]).flatten(0, 1) for o in outs])
            channels = channels + normed.abs().mean(0) + x.abs().mean(0)
        channels = channels + torch.cat([o.hidden_states[-1].flatten(0, 1) for o in outs]).abs().mean(0)

    assert got.tokens == sum(b.numel() for b in batches)
    for name, want in (("layers", torch.stack(layers)), ("heads", torch.stack(heads)),
                       ("neurons", torch.stack(neurons)), ("channels", channels)):
        torch.testing.assert_close(getattr(got, name), want.double(), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(got.kv_groups(2), got.heads.view(3, 2, 2).sum(-1))


# ----------------------------------------------------------------------------------------------
# choices from given scores
# ----------------------------------------------------------------------------------------------


def test_choices_keep_whole_kv_groups_and_the_best_heads_within_them():
    heads = torch.tensor([[1.0, 2.0, 9.0, 0.0, 3.0, 3.0],  # groups (0,1) 3, (2,3) 9, (4,5) 6
                          [5.0, 5.0, 1.0, 1.0, 0.0, 7.0]], dtype=torch.float64)
    imp = Importance(layers=torch.tensor([0.1, 0.3], dtype=torch.float64), heads=heads,
                     neurons=torch.tensor([[1.0, 3.0, 2.0], [2.0, 2.0, 1.0]], dtype=torch.float64),
                     channels=torch.tensor([0.5, 0.2, 0.9, 0.2], dtype=torch.float64), tokens=1)
    choice = choose(imp, StudentShape(layers=2, heads=2, kv_heads=2, intermediate_size=2, hidden_size=2), 3)
    first, second = choice.layers
    assert (first.kv_heads, first.q_heads, first.neurons) == ((1, 2), (2, 4), (1, 2))  # tie 4/5: the lower
    assert (second.kv_heads, second.q_heads, second.neurons) == ((0, 2), (0, 5), (0, 1))
    assert choice.channels == (0, 2) and [choice.kv_of(h) for h in first.q_heads] == [1, 2]
    one = choose(imp, StudentShape(layers=1, heads=1, kv_heads=1, intermediate_size=1, hidden_size=1), 3)
    assert [layer.teacher_layer for layer in one.layers] == [1] and one.layers[0].q_heads == (0,)
    assert top_indices(torch.tensor([1.0, 1.0, 1.0]), 2) == (0, 1)


# ----------------------------------------------------------------------------------------------
# (e) refusals, before any weight loads
# ----------------------------------------------------------------------------------------------

# the teacher: LLaMA with 4 layers, hidden 64, 8 heads, 4 kv heads (2 per group), MLP 128, 256 positions
REFUSALS = [
    (["--layers", "5"], "--layers 5: the teacher has 4 layers"),
    (["--layers", "0"], "--layers 0"),
    (["--kv-heads", "5"], "--kv-heads 5: the teacher has 4 kv heads"),
    (["--heads", "6"], "--heads 6 is not a multiple of --kv-heads 4 (the teacher's: --kv-heads was left out)"),
    (["--heads", "6", "--kv-heads", "4"], "--kv-heads one of [1, 2, 3]"),
    (["--heads", "6", "--kv-heads", "1"], "a kept query head keeps its own kv head: choose --heads at most 2"),
    (["--heads", "8", "--kv-heads", "2"], "or more --kv-heads (at least 4)"),
    (["--intermediate-size", "129"], "--intermediate-size 129: the teacher has 128"),
    (["--hidden-size", "60"], "--hidden-size 60 with --heads 8"),
    (["--hidden-size", "60"], "wants --hidden-size a multiple of --heads 8 (e.g. 56 or 64)"),
    (["--seq-len", "300"], "--seq-len 300"),
    (["--calibration-batches", "0"], "--calibration-batches 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--dtype", "bfloat16"], "--dtype bfloat16"),
    (["--device", "cuda:7"], "--device cuda:7: no such CUDA device here"),
]


@pytest.mark.parametrize("options,message", REFUSALS, ids=[" ".join(o) for o, _ in REFUSALS])
def test_bad_options_are_refused_naming_the_flag(options, message, tiny_teacher, tiny_data, tmp_path, capsys):
    out = tmp_path / "student"
    assert _prune(tiny_teacher, tiny_data[1], out, *options) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_paths_are_refused_naming_the_flag(tiny_teacher, tiny_data, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert _prune(tiny_teacher, tiny_data[1], used) == 2
    assert f"--out {used} exists and is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in used.iterdir()] == ["keep.txt"]

    assert _prune(tmp_path / "nowhere", tiny_data[1], tmp_path / "a") == 2
    assert f"--teacher {tmp_path / 'nowhere'} is not a Hugging Face model directory (no config.json)" in \
        capsys.readouterr().err
    assert _prune(tiny_teacher, tmp_path, tmp_path / "b") == 2
    assert f"--data {tmp_path}" in capsys.readouterr().err

    moe, _ = save_model("mixtral_window", tmp_path / "moe", vocab=VOCAB)
    assert _prune(moe, tiny_data[1], tmp_path / "c") == 2
    assert "is a 'mixtral' model; pruning slices the LLaMA layout of llama, mistral, qwen2, qwen3" in \
        capsys.readouterr().err

    assert not any((tmp_path / name).exists() for name in "abcd")


def test_a_teacher_with_its_tokenizer_ships_it_and_refuses_data_of_another(tiny_teacher, tiny_data, tmp_path,
                                                                          capsys):
    """The teacher's tokenizer files go with the student (so evaluation and training can check
    them); data prepared with another tokenizer is refused (its ids would mean other text)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    tokenizer = tiny_data[0]
    names = [p.name for p in tokenizer.iterdir() if p.name in TOKENIZER_FILES]
    for name in names:
        shutil.copy2(tokenizer / name, teacher / name)
    assert _prune(teacher, tiny_data[1], tmp_path / "student", "--hidden-size", 32) == 0
    assert names and all((tmp_path / "student" / name).read_bytes() == (tokenizer / name).read_bytes()
                         for name in names)
    capsys.readouterr()

    (teacher / names[0]).write_bytes((teacher / names[0]).read_bytes() + b" ")  # another tokenizer
    assert _prune(teacher, tiny_data[1], tmp_path / "other") == 2
    assert "pass --data prepared with the model's tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_an_empty_out_directory_is_used(tiny_teacher, tiny_data, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert _prune(tiny_teacher, tiny_data[1], out, "--layers", 1) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "pruning.json"]
    assert not [p for p in tmp_path.iterdir() if p.name != "empty"]  # no temporary directory left
