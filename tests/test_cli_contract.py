"""The command-line contract every public command shares, in one table: each is a
``shd_common.cli.command_parser``, so an abbreviated flag is an error (exit 2, the flag named), never
a guess (``--resum none`` read as ``--resume none``, ``--overwr`` as ``--overwrite``), sub-commands
included; and ``--help`` names the command as the user types it."""

from __future__ import annotations

import importlib

import pytest

#: (module with main(argv), argv with one abbreviated flag, that flag, the prog --help prints)
COMMANDS = [
    ("pipeline.train", ["--resum", "none"], "--resum", "python -m pipeline.train"),
    ("pipeline.train", ["--force", "--config", "x.yaml"], "--force", "python -m pipeline.train"),
    ("pipeline.train", ["--move", "--config", "x.yaml"], "--move", "python -m pipeline.train"),
    ("pipeline.evaluate", ["--checkpoint", "C", "--max-b", "3"], "--max-b", "python -m pipeline.evaluate"),
    ("pipeline.export", ["--checkpoint", "C", "--out", "O", "--over"], "--over", "python -m pipeline.export"),
    ("pipeline.universal", ["--checkpoint", "C", "--work", "2"], "--work", "python -m pipeline.universal"),
    ("pipeline.import_gguf", ["--gguf", "x.gguf", "--out", "o", "--dt", "float32"], "--dt", "python -m pipeline.import_gguf"),
    ("pipeline.prune", ["--teacher", "t", "--data", "d", "--out", "o", "--layer", "2"], "--layer",
     "python -m pipeline.prune"),
    ("pipeline.study.cli", ["--stp", "3"], "--stp", "python -m pipeline.study"),
    ("data_prep.shard", ["--input", "x", "--tokenizer", "t", "--out", "o", "--overwr"], "--overwr",
     "python -m data_prep.shard"),
    ("data_prep.shard", ["--input", "x", "--tokenizer", "t", "--out", "o", "--work=2"], "--work=2",
     "python -m data_prep.shard"),
    ("data_prep.shard", ["merge", "--out", "o", "--ov"], "--ov", "python -m data_prep.shard"),
    ("data_prep.tokenizer", ["train", "--input", "x", "--out", "o", "--overwr"], "--overwr",
     "python -m data_prep.tokenizer"),
]


@pytest.mark.parametrize("module, argv, flag, prog", COMMANDS, ids=[f"{c[0]} {c[2]}" for c in COMMANDS])
def test_an_abbreviated_flag_is_refused_by_name(module, argv, flag, prog, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    assert e.value.code == 2
    assert f"error: unrecognized arguments: {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("module, prog", sorted({(c[0], c[3]) for c in COMMANDS}))
def test_help_names_the_command_as_typed(module, prog, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: {prog}")
