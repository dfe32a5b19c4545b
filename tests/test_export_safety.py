"""Export and evaluate lose nothing and refuse silent mistakes (issue 15 items 3, 6, 9).

Export never writes over a directory that is not an earlier export of the same run (the teacher's,
a sharded HF model, another run's export), moves replaced contents aside instead of deleting them
(an unchanged earlier export of the same run excepted), and refuses NaN/inf weights (exit 3).
Evaluate refuses data prepared with another tokenizer than the model's, also of the same
vocabulary size (exit 2). Evaluate tests are single-process on a tiny HF model written with
save_pretrained; the export tests need a real ZeRO-3 checkpoint (the shared ``ref_run``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from data_prep.shard import ShardOptions, build_shards
from pipeline import evaluate, export
from shd_common.manifest import TOKENIZER_FILES, read_manifest
from tests.data_fixtures import make_tokenizer, tiny_documents, write_jsonl

EVAL_ARGS = ["--seq-len", "32", "--max-batches", "1"]


@pytest.fixture(scope="module")
def other_data(tmp_path_factory, tiny_data):
    """(tokenizer_dir, data_dir) of another tokenizer, trained on other text, of the same vocab size."""
    root = tmp_path_factory.mktemp("other_corpus")
    docs = [d.upper() for d in tiny_documents(120, seed=1)]
    tok = make_tokenizer(root, docs, vocab_size=400)
    data = root / "data"
    build_shards(ShardOptions(inputs=(str(write_jsonl(root / "corpus.jsonl", docs)),), tokenizer=tok,
                              out=data, val_fraction=0.1, shard_tokens=2000))
    assert read_manifest(data).tokenizer.vocab_size == read_manifest(tiny_data[1]).tokenizer.vocab_size
    return tok, data


def hf_model(out: Path, vocab_size: int, tokenizer: Path | None = None, **save_kw) -> Path:
    """A tiny LLaMA saved with save_pretrained, with `tokenizer`'s files copied beside it if given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(out, **save_kw)
    for name in TOKENIZER_FILES if tokenizer is not None else ():
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, out / name)
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def vocab_of(data_dir: Path) -> int:
    return read_manifest(data_dir).tokenizer.vocab_size


# ------------------------------------------------------------------------------------------------
# single process
# ------------------------------------------------------------------------------------------------


def test_nonfinite_weights_are_named(tmp_path):
    state = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([7]),
             "c": torch.tensor([float("-inf")])}
    assert export.nonfinite_tensors(state) == ["b", "c"]
    with pytest.raises(export.NonFiniteWeights, match=r"non-finite weights \(NaN/inf\) in b, c: it is not usable"):
        export.check_finite(state, tmp_path / "step_00000010")
    export.check_finite({"a": torch.ones(3)}, tmp_path)  # finite: no error


def test_evaluate_refuses_data_of_another_tokenizer(tiny_data, other_data, tmp_path, capsys):
    tok, data = tiny_data
    model = hf_model(tmp_path / "model", vocab_of(data), tok)
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(model), "--data", str(other_data[1]), *EVAL_ARGS]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert f"tokenizer files in {model}" in err and str(other_data[1]) in err and "--data" in err

    assert evaluate.main(["--checkpoint", str(model), "--data", str(data), *EVAL_ARGS]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")


def test_evaluate_model_dir_takes_data_and_seq_len_from_its_training_config(tiny_data, tmp_path, capsys):
    import yaml

    tok, data = tiny_data
    model = hf_model(tmp_path / "model", vocab_of(data), tok)
    assert evaluate.main(["--checkpoint", str(model), *EVAL_ARGS]) == 2  # nothing records the data
    assert "records no training data" in capsys.readouterr().err
    config = {"data": {"dir": str(tmp_path / "gone"), "seq_len": 16}}
    (model / "training_config.yaml").write_text(yaml.safe_dump(config))
    assert evaluate.main(["--checkpoint", str(model), *EVAL_ARGS]) == 2
    err = capsys.readouterr().err
    assert "training_config.yaml names data.dir" in err and "--data" in err
    config["data"]["dir"] = str(data)
    (model / "training_config.yaml").write_text(yaml.safe_dump(config))
    assert evaluate.main(["--checkpoint", str(model), "--max-batches", "1", "--micro-batch-size", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("perplexity ") and line.endswith("tokens 32"), line  # 2 x seq_len 16 labels
    assert len(line.split()[1].split(".")[1]) == 6  # more than 4 decimals


def test_evaluate_model_without_tokenizer_needs_one(tiny_data, other_data, tmp_path, capsys):
    tok, data = tiny_data
    model = hf_model(tmp_path / "model", vocab_of(data))
    capsys.readouterr()
    base = ["--checkpoint", str(model), "--data", str(data), *EVAL_ARGS]

    assert evaluate.main(base) == 2
    err = capsys.readouterr().err
    assert f"{model} records no tokenizer" in err and "--tokenizer DIR" in err and "--skip-tokenizer-check" in err
    assert evaluate.main([*base, "--tokenizer", str(other_data[0])]) == 2
    assert f"--tokenizer {other_data[0]}" in capsys.readouterr().err

    assert evaluate.main([*base, "--tokenizer", str(tok)]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")
    assert evaluate.main([*base, "--skip-tokenizer-check"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("perplexity ") and "not compared" in err


# ------------------------------------------------------------------------------------------------
# a real checkpoint (2-rank reference run)
# ------------------------------------------------------------------------------------------------


def export_main(capsys, *argv) -> tuple[int, str]:
    code = export.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def siblings(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.{kind}-*"))


def nan_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of checkpoint `src` whose rank-0 fp32 partition starts with NaN (committed as an
    unverified, pre-file-list checkpoint: empty COMPLETE)."""
    shutil.copytree(src, dst)
    part = dst / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    sd = torch.load(part, weights_only=False)
    with torch.no_grad():  # the saved partition is a leaf that requires grad
        sd["optimizer_state_dict"]["fp32_flat_groups"][0][0] = float("nan")
    torch.save(sd, part)
    (dst / "COMPLETE").write_text("")
    return dst


@pytest.mark.multiprocess
def test_export_never_loses_data(ref_run, tiny_teacher, tiny_data, other_data, tmp_path, capsys):
    work, _, _ = ref_run
    ckpts = work / "run" / "checkpoints"

    # the teacher's directory: refused, every file byte-identical
    teacher = shutil.copytree(tiny_teacher, tmp_path / "teacher")
    before = snapshot(teacher)
    code, err = export_main(capsys, "--checkpoint", ckpts, "--out", teacher)
    assert code == 2 and f"--out {teacher} is not empty and is not an earlier export" in err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert snapshot(teacher) == before and not siblings(teacher, "tmp")

    # a sharded HF folder: refused; with --overwrite moved aside whole, no stale index in the export
    sharded = hf_model(tmp_path / "sharded", vocab_of(tiny_data[1]), max_shard_size="40KB")
    before = snapshot(sharded)
    assert any(n.endswith(".index.json") for n in before) and len(before) > 4
    assert export_main(capsys, "--checkpoint", ckpts, "--out", sharded)[0] == 2
    assert snapshot(sharded) == before
    code, err = export_main(capsys, "--checkpoint", ckpts, "--out", sharded, "--overwrite")
    assert code == 0, err
    [aside] = siblings(sharded, "moved")
    assert snapshot(aside) == before and f"moved {sharded} aside to {aside}" in err
    assert not list(sharded.glob("*.index.json")) and not list(sharded.glob("model-*"))
    assert export.read_marker(sharded)["step"] == 10

    # re-export over our own export: replaced in place, nothing left beside it
    out = tmp_path / "hf"
    assert export_main(capsys, "--checkpoint", ckpts / "step_00000008", "--out", out)[0] == 0
    assert export_main(capsys, "--checkpoint", ckpts, "--out", out)[0] == 0
    assert export.read_marker(out)["step"] == 10 and not siblings(out, "moved") and not siblings(out, "tmp")
    # ... but a file it did not write (or one edited since) is kept: the old export is moved aside
    (out / "notes.txt").write_text("mine")
    code, err = export_main(capsys, "--checkpoint", ckpts, "--out", out)
    assert code == 0, err
    [aside] = siblings(out, "moved")
    assert (aside / "notes.txt").read_text() == "mine" and not (out / "notes.txt").exists()

    # the export of another run (a teacher exported by this project, say): refused; --overwrite keeps it
    other_run = shutil.copytree(ckpts / "step_00000010", tmp_path / "other_run" / "step_00000010")
    theirs = tmp_path / "theirs"
    assert export_main(capsys, "--checkpoint", other_run, "--out", theirs)[0] == 0
    before = snapshot(theirs)
    code, err = export_main(capsys, "--checkpoint", ckpts, "--out", theirs)
    assert code == 2 and f"holds the export of another run ({other_run})" in err and snapshot(theirs) == before
    assert export_main(capsys, "--checkpoint", ckpts, "--out", theirs, "--overwrite")[0] == 0
    [aside] = siblings(theirs, "moved")
    assert snapshot(aside) == before

    # refused before anything is written: --out overlapping the checkpoint, a foreign tokenizer
    assert export_main(capsys, "--checkpoint", ckpts, "--out", ckpts, "--overwrite")[0] == 2
    code, err = export_main(capsys, "--checkpoint", ckpts, "--out", tmp_path / "t", "--tokenizer", other_data[0])
    assert code == 2 and "is not the tokenizer the checkpoint was trained with" in err
    assert not (tmp_path / "t").exists()

    # NaN weights: exit 3, the bad tensor named, nothing written
    bad = nan_checkpoint(ckpts / "step_00000010", tmp_path / "bad" / "step_00000010")
    code, err = export_main(capsys, "--checkpoint", bad, "--out", tmp_path / "nan")
    assert code == 3 and "non-finite weights (NaN/inf) in model." in err and "not usable" in err
    assert not (tmp_path / "nan").exists() and not siblings(tmp_path / "nan", "tmp")

    # evaluate a checkpoint on data of another tokenizer: refused before any model is built
    assert evaluate.main(["--checkpoint", str(ckpts), "--data", str(other_data[1])]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpts / 'step_00000010'}" in err and str(other_data[1]) in err
