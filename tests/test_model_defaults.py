"""What a run takes without being told: the document separator, the student fields derived from the
teacher, the teacher's placement (auto) and precision. Each is printed at start-up; a value the
user gives always wins."""

from __future__ import annotations

import pytest
import torch

from data_prep.encode import document_separator
from pipeline.config import ConfigError, config_from_dict
from pipeline.data.reader import split_tokens
from pipeline.models.hf_configs import derived_student_fields, student_hf_config
from pipeline.training.deepspeed_config import (
    PlacementEstimate,
    build_ds_configs,
    resolve_placement,
    resolve_teacher_dtype,
)
from pipeline.training.preflight import Preflight
from shd_common.manifest import DataError
from tests.helpers import tiny_config


def _hf_tokenizer(tmp_path, eos: str, extra: tuple[str, ...] = ()):
    """A real word-level tokenizer (tokenizers library) whose EOS and pad are both `eos`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(("<unk>", *extra, eos, "hello", "world"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos, pad_token=eos)
    fast.save_pretrained(tmp_path / "tok")
    return fast


def test_separator_prefers_the_pretraining_end_of_text_over_a_chat_turn_end(tmp_path):
    chat = _hf_tokenizer(tmp_path / "chat", "<|im_end|>", extra=("<|endoftext|>",))
    assert document_separator(chat).token == "<|endoftext|>"
    assert document_separator(chat, "<|im_end|>").id == chat.convert_tokens_to_ids("<|im_end|>")
    assert document_separator(chat, "1").token == "<|endoftext|>"  # by id
    with pytest.raises(DataError, match="--separator '<eos>': not a token"):
        document_separator(chat, "<eos>")
    only_chat = _hf_tokenizer(tmp_path / "only", "<|im_end|>")
    assert document_separator(only_chat).token == "<|im_end|>"  # nothing better: its EOS
    plain = _hf_tokenizer(tmp_path / "plain", "</s>")
    assert document_separator(plain).token == "</s>"


def test_shards_made_with_pad_equal_to_eos_keep_every_boundary(tmp_path):
    """A tokenizer whose pad is its EOS: the separators are in the shards and, in training, ordinary
    targets and keys (nothing is masked)."""
    from data_prep.shard import ShardOptions, build_shards
    from pipeline.data.reader import PackedSampleReader

    tok = _hf_tokenizer(tmp_path, "</s>")
    assert tok.pad_token_id == tok.eos_token_id
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join('{"text": "hello world hello"}\n' for _ in range(40)))
    manifest = build_shards(ShardOptions(inputs=(str(corpus),), tokenizer=tmp_path / "tok", out=tmp_path / "d",
                                         val_fraction=0.0))
    assert manifest.options["separator"] == {"id": tok.eos_token_id, "token": "</s>"}
    batch = PackedSampleReader(tmp_path / "d", seq_len=8).next_batch(4)
    assert int((batch == tok.eos_token_id).sum()) >= 4
    split = split_tokens(batch)
    assert split.mask is None and bool(split.valid.all()) and bool((split.labels == tok.eos_token_id).any())


def test_right_padding_is_given_by_lengths_never_by_token_id():
    tokens = torch.tensor([[5, 2, 7, 2, 9], [5, 6, 2, 2, 2]])  # id 2 is both a separator and the pad here
    batch = split_tokens(tokens, lengths=torch.tensor([5, 3]))
    assert batch.mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.valid.tolist() == [[True] * 4, [True, True, False, False]]


def _teacher_config(tmp_path, **fields):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **fields)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_student_fields_left_empty_come_from_the_teacher_and_given_ones_stay(tiny_data, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    teacher = _teacher_config(tmp_path, tie_word_embeddings=True, rope_parameters=rope)
    cfg = config_from_dict(tiny_config(tmp_path / "run", tiny_data, teacher, **{
        "student.max_position_embeddings": None}))
    pre = Preflight(cfg)
    s = pre.student_cfg
    assert s.tie_word_embeddings and s.max_position_embeddings == 4096 and s.rope_parameters == rope
    assert set(derived_student_fields(cfg.student, pre.teacher_cfg)) == {
        "max_position_embeddings", "tie_word_embeddings", "rope_parameters"}
    notes = "\n".join(pre.notes())
    assert "tie_word_embeddings=True (teacher)" in notes and "num_attention_heads 3/4" in notes
    assert "separated by" in notes

    given = config_from_dict(tiny_config(tmp_path / "run2", tiny_data, teacher, **{
        "student.rope_theta": 1e4, "student.tie_word_embeddings": False, "student.max_position_embeddings": 128}))
    s = student_hf_config(given, 400, Preflight(given).teacher_cfg)
    assert (not s.tie_word_embeddings and s.max_position_embeddings == 128
            and s.rope_parameters == {"rope_type": "default", "rope_theta": 1e4})
    assert "rope" in "\n".join(Preflight(given).notes())  # the difference from the teacher is said


def test_a_derived_max_positions_below_seq_len_is_refused_naming_the_field(tiny_data, tmp_path):

    from transformers import LlamaConfig

    teacher = _teacher_config(tmp_path)
    small = LlamaConfig.from_pretrained(teacher)
    small.max_position_embeddings = 16
    small.save_pretrained(teacher)
    cfg = config_from_dict(tiny_config(tmp_path / "run", tiny_data, teacher, **{"student.max_position_embeddings": None}))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        Preflight(cfg)


GIB = 2**30


@pytest.mark.parametrize("world, per_node, teacher_gib, memory_gib, offload, want", [
    (1, 1, 100.0, 8.0, False, "replicated"),  # one rank: nothing to gather from
    (8, 8, 14.0, 80.0, False, "replicated"),  # a 7B bf16 teacher on 80 GB GPUs
    (8, 8, 140.0, 80.0, False, "partitioned"),  # a 70B teacher
    (16, 8, 140.0, 80.0, False, "node"),  # 70B over two nodes: a node's share (17.5 GiB) fits
    (16, 8, 14.0, 80.0, True, "partitioned"),  # offloading asks for ZeRO-3 partitions
])
def test_auto_placement_replicates_what_fits_and_partitions_the_rest(tiny_data, tmp_path, world, per_node,
                                                                       teacher_gib, memory_gib, offload, want):
    cfg = config_from_dict(tiny_config(tmp_path, tiny_data, tmp_path / "t", **{
        "teacher.placement": "auto", "teacher.offload_params": offload}))
    estimate = PlacementEstimate(teacher_bytes=int(teacher_gib * GIB), student_params=100_000_000,
                                 memory_per_rank=int(memory_gib * GIB), memory_source="test")
    assert resolve_placement(cfg, world, per_node, estimate).kind == want
    assert "GiB per rank" in estimate.describe(world)


def test_a_pretraining_run_has_no_teacher_to_place(tiny_data, tmp_path):
    """stage pretrain with the default placement (auto): nothing to estimate, no error."""
    cfg = config_from_dict(tiny_config(tmp_path, tiny_data, None, **{"teacher.placement": "auto"}))
    assert not cfg.uses_teacher and resolve_placement(cfg, 2, 2).kind == "partitioned"


def test_teacher_precision_is_its_own(tiny_data, tmp_path):
    base = tiny_config(tmp_path, tiny_data, tmp_path / "t")
    same = config_from_dict(base)
    assert resolve_teacher_dtype(same) == torch.float32
    bf16 = config_from_dict(tiny_config(tmp_path, tiny_data, tmp_path / "t", **{"teacher.dtype": "bf16"}))
    assert resolve_teacher_dtype(bf16) == torch.bfloat16
    student_ds, teacher_ds = build_ds_configs(bf16, 2)
    assert not student_ds["bf16"]["enabled"] and teacher_ds["bf16"]["enabled"]


def test_a_gguf_file_as_teacher_names_the_import_command(tiny_data, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"is a GGUF file: convert it once with `python -m pipeline.import_gguf"):
        Preflight(config_from_dict(tiny_config(tmp_path / "run", tiny_data, gguf)))
