"""Train a LLaMA-style SentencePiece tokenizer and write it as a Hugging Face tokenizer directory.

    python -m data_prep.tokenizer train --input python-stdlib --vocab-size 8000 --out runs/tok

The model is BPE with byte fallback and split digits, identity normalization and no whitespace
folding, like LLaMA's, with ids unk=0, bos=1, eos=2 as in LLaMA, plus `<pad>`=3 (a control piece:
a real vocabulary entry that text never encodes to, so models can embed it). OUT gets
`tokenizer.model` (SentencePiece) and `tokenizer.json` + `tokenizer_config.json`, which
`transformers.AutoTokenizer.from_pretrained(OUT)` loads as a `TokenizersBackend` whose ids equal
SentencePiece's; training checks that on probe strings and on sample lines before returning. Use
`split_special_tokens=True` when encoding raw text with it, as SentencePiece does not treat a
literal "</s>" in text as EOS (data_prep.shard does this).

Training reads at most --max-sentences non-empty lines, sampled here with the seed (reservoir
sampling, kept in input order), so the same inputs and seed give byte-identical files.
SentencePiece's own sampling (`input_sentence_size`) is not used: it draws differently in every
process whatever `set_random_generator_seed` says (measured with sentencepiece 0.2), which made
every fresh tokenizer, and so every teacher and result downstream of it, different.

A non-empty OUT is refused without --overwrite. With it, the new tokenizer is written and checked
beside OUT and then swapped in whole (`train_tokenizer`): a kill at any point leaves the old or the
new tokenizer in OUT, never neither, and the old directory is deleted only when this command made it
and nothing in it changed since (its `.shd-made.json` marker), else moved aside to OUT.moved-<time>.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import model_validator

from data_prep.cli import Options, add_options, option, options_from_args, run_cli
from data_prep.documents import InputReport
from data_prep.sources import iter_documents, resolve_inputs
from shd_common.cli import command_parser
from shd_common.manifest import TOKENIZER_FILES, DataError, load_hf_tokenizer
from shd_common.safe_remove import MOVED_INFIX, clear, mark, marked, replace_dir

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SPECIAL_PIECES = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# 3 special pieces, <pad> and the 256 byte-fallback pieces are always in the vocabulary.
MIN_VOCAB_SIZE = 4 + 256 + 1
#: Raised whenever the same command and inputs would train a different tokenizer, so that what was
#: made by older code is rebuilt, not reused (the study's data markers record it). 2: the seeded
#: line sampling above (before: SentencePiece's, different in every process).
TRAINING_RECIPE = 2
#: The `safe_remove` marker kind of a tokenizer directory this command wrote.
TOKENIZER_KIND = "tokenizer"
PROBES = ("Hello world", " leading space", "  two leading spaces", "trailing  ", "digits 1234567890 and 3.14159",
          "tabs\tand\nnewlines\n\n\nend\n", "unicode: héllo wörld — 日本語 😀 \u00a0nbsp", " ", "\n", "    ",
          "def f(x):\n    return x + 1\n", "<s> literal </s> <pad> <unk>", "a\r\nb", "ﬁ ŉ ǅ ½")


class TokenizerTrainOptions(Options):
    """Options of `python -m data_prep.tokenizer train`."""

    inputs: tuple[str, ...] = option(flag="--input", help="files, directories, globs, dataset names or a named "
                                                          "corpus (python-stdlib)")
    out: Path = option(help="directory to write the tokenizer into")
    vocab_size: int = option(32000, "vocabulary size, special pieces included")
    seed: int = option(0, "seed of the sentence sampling")
    text_field: str = option("text", "record field holding the text (jsonl/parquet/datasets)")
    max_sentences: int = option(2_000_000, "lines sampled for training")
    overwrite: bool = option(False, "replace what --out holds; the new tokenizer is complete before it takes its "
                                    "place, and the old directory is moved aside unless this command made it")

    @model_validator(mode="after")
    def _values(self) -> TokenizerTrainOptions:
        if not self.inputs:
            raise DataError("--input: give at least one input")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise DataError(f"--vocab-size {self.vocab_size}: at least {MIN_VOCAB_SIZE} (specials + 256 bytes + 1)")
        if self.seed < 0 or self.max_sentences < 1:
            raise DataError("--seed must be >= 0 and --max-sentences >= 1")
        return self


def _training_lines(options: TokenizerTrainOptions, report: InputReport) -> Iterator[str]:
    sources = resolve_inputs(options.inputs)
    for doc in iter_documents(sources, options.text_field, report):
        yield from (line for line in doc.text.split("\n") if line.strip())


def sample_lines(lines: Iterable[str], count: int, seed: int) -> list[str]:
    """A uniform sample of `count` lines (all when there are fewer), in input order, the same for
    the same lines and seed (reservoir sampling)."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for index, line in enumerate(lines):
        if index < count:
            reservoir.append((index, line))
        else:
            slot = rng.randrange(index + 1)
            if slot < count:
                reservoir[slot] = (index, line)
    return [line for _, line in sorted(reservoir)]


def _nonempty_training_lines(options: TokenizerTrainOptions, report: InputReport) -> Iterator[str]:
    """`_training_lines`, or a DataError naming the inputs when they hold no text (before any training)."""
    lines = _training_lines(options, report)
    first = next(lines, None)
    if first is None:
        raise DataError(f"no text in the inputs ({', '.join(options.inputs)}); check --input and --text-field"
                        + "".join(f"; {line}" for line in report.summary_lines()))
    return itertools.chain([first], lines)


def _train_sentencepiece(options: TokenizerTrainOptions, report: InputReport) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    sentences = sample_lines(_nonempty_training_lines(options, report), options.max_sentences, options.seed)
    spm.set_random_generator_seed(options.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model,
            model_type="bpe", vocab_size=options.vocab_size, byte_fallback=True, split_digits=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, pad_piece=SPECIAL_PIECES["pad_token"],
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, character_coverage=0.99995, max_sentencepiece_length=16,
            input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=min(os.cpu_count() or 1, 16), minloglevel=2)
    except RuntimeError as exc:  # sentencepiece reports bad corpora and vocab sizes this way
        raise DataError(f"sentencepiece training failed: {exc}") from exc
    return model.getvalue()


def _write_hf_directory(model: bytes, out: Path) -> None:
    """Convert the SentencePiece model with transformers itself and save `tokenizer.json` beside it."""
    with tempfile.TemporaryDirectory(dir=out) as staging:
        (Path(staging) / "tokenizer.model").write_bytes(model)
        config = {"tokenizer_class": "TokenizersBackend", **SPECIAL_PIECES}
        (Path(staging) / "tokenizer_config.json").write_text(json.dumps(config))
        load_hf_tokenizer(staging).save_pretrained(str(out))
    (out / "tokenizer.model").write_bytes(model)


def check_same_ids(out: Path, samples: list[str]) -> None:
    """Fail unless the saved HF tokenizer encodes and decodes like SentencePiece on the given texts."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=(out / "tokenizer.model").read_bytes())
    hf = load_hf_tokenizer(out)
    for text in samples:
        expected = sp.encode(text)
        got = hf.encode(text, add_special_tokens=False, split_special_tokens=True)
        if got != expected or hf.decode(got) != sp.decode(expected):
            raise DataError(f"{out}: the Hugging Face tokenizer disagrees with SentencePiece on {text!r}: "
                            f"{got} != {expected}")
    ids = (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    if ids != (UNK_ID, BOS_ID, EOS_ID, PAD_ID) or len(hf) != sp.get_piece_size():
        raise DataError(f"{out}: special ids {ids} or vocabulary {len(hf)} differ from SentencePiece's")


def staging_dir(out: Path) -> Path:
    """Where the new tokenizer is written and checked before it takes `out`'s place (beside it, so on
    the same filesystem); after a kill it holds that unfinished one, or the old one after the swap."""
    return out.parent / f".{out.name}.tokenizer-staging"


def _check_destination(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty `out` without --overwrite, saying what it holds and what --overwrite does."""
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory; choose another --out")
    if not held or overwrite:
        return
    existing = [name for name in TOKENIZER_FILES if name in held]
    what = f"already holds a tokenizer ({', '.join(existing)})" if existing else \
        f"is not empty ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''})"
    raise DataError(f"{out}: {what}; choose another --out, or pass --overwrite to replace it (the new tokenizer "
                    f"is complete before it takes its place; the old directory is deleted if this command made "
                    f"it and nothing in it changed since, else moved aside to {out.name}{MOVED_INFIX}<time>)")


def train_tokenizer(options: TokenizerTrainOptions) -> InputReport:
    """Train, write and check the tokenizer, then put it in `options.out`; returns what was skipped.

    Crash-safe like `data_prep.shard --overwrite`: the tokenizer is built and checked in
    `staging_dir(out)` and swapped in whole (`safe_remove.replace_dir`), so after a kill at any
    point `out` holds the old or the new tokenizer, never a mix or nothing; the next run clears what a
    killed one left in staging.
    """
    out, staging = options.out, staging_dir(options.out)
    _check_destination(out, options.overwrite)
    clear(staging, ours=marked(TOKENIZER_KIND), name_for=out,
          reason="left by a tokenizer training that was killed (unfinished, or the tokenizer it replaced)")
    report = InputReport()
    model = _train_sentencepiece(options, report)  # first: bad input must not cost the old tokenizer
    mark(staging, TOKENIZER_KIND)
    _write_hf_directory(model, staging)
    samples = list(PROBES)
    for line in _training_lines(options, InputReport()):
        if len(samples) >= len(PROBES) + 200:
            break
        samples.append(line)
    check_same_ids(staging, samples)
    mark(staging, TOKENIZER_KIND, files=True)
    replace_dir(staging, out, ours=marked(TOKENIZER_KIND), reason="replaced by the new tokenizer (--overwrite)")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = command_parser("python -m data_prep.tokenizer", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_options(commands.add_parser("train", help="train a tokenizer"), TokenizerTrainOptions)
    options = options_from_args(TokenizerTrainOptions, parser.parse_args(argv))
    report = train_tokenizer(options)
    print(f"wrote {options.out}: vocab {options.vocab_size} ({', '.join(sorted(os.listdir(options.out)))})",
          file=sys.stderr)
    for line in report.summary_lines():
        print(f"  {line}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
