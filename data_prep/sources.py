"""Input resolution and document reading for `data_prep.tokenizer` and `data_prep.shard`.

An input is, in this order of precedence: a named corpus (`python-stdlib`), an existing file, an
existing directory (a `datasets.save_to_disk` directory, or else every supported file under it), a
glob, or a Hugging Face Hub dataset `owner/name[:config]` (its `train` split). Documents come out in a
deterministic order: inputs as given, files sorted by path, records in file order. Records that
cannot be used are counted in an `InputReport` (with the first few places) instead of vanishing.

Files are read as what they are (`file_kind`): a `.jsonl` one JSON record per line; a `.json` as
JSON Lines too, unless its first non-blank character is `[`: then it is one JSON array (pretty-printed
or not) whose elements are records or strings, streamed; a `.txt` is one document, or one document
per non-blank line with `txt_documents="line"` (`--txt-documents line`); a parquet file by rows. A
document longer than the report's `max_document_bytes` is refused with its size and the fix before
it is tokenized: tokenizing one text at once takes about 100 times its size in memory.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.corpora import NAMED_CORPORA, NamedCorpus
from data_prep.documents import Document, InputReport, Source, decode_text
from shd_common.manifest import DataError

FILE_KINDS = {".txt": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
#: How a `.txt` file is read: one document per file, or one per non-blank line.
TXT_DOCUMENTS = ("file", "line")
_JSON_CHUNK = 1 << 20
_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")
_DATASET_DIR_MARKERS = ("state.json", "dataset_dict.json")


def _record_text(record: Any, text_field: str, origin: str, report: InputReport) -> str | None:
    value = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        report.note("missing_text_field", origin, f"no string field {text_field!r}")
        return None
    return value


def _read_text_file(path: Path, report: InputReport) -> Iterator[Document]:
    """The whole file as one document (its size checked before it is read)."""
    report.check_size(path.stat().st_size, str(path), "bytes")
    report.note("txt_files_read_whole", str(path))
    yield Document(decode_text(path.read_bytes(), str(path), report), str(path))


def _read_text_lines(path: Path, report: InputReport, start: int = 0, stop: int | None = None) -> Iterator[Document]:
    """Each non-blank line of `path` (beginning in bytes [start, stop)) as one document, without its newline."""
    for origin, raw in _jsonl_lines(path, start, stop):
        if raw.strip():
            yield Document(decode_text(raw, origin, report).rstrip("\r\n"), origin)


def _jsonl_lines(path: Path, start: int, stop: int | None) -> Iterator[tuple[str, bytes]]:
    """(origin, line) of the lines of `path` that begin in bytes `[start, stop)` (all: 0, None), streamed.

    Cutting a file at any byte offsets gives every line to exactly one range: a range skips the line
    its first byte falls in (unless that byte begins a line) and finishes the line it stops inside.
    Origins are `path:LINE` for a range from the start of the file, else `path@BYTE_OFFSET` (line
    numbers would need the bytes before the range).
    """
    with open(path, "rb") as f:
        pos = 0
        if start > 0:
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())  # past the rest of the line that began before `start`
        lineno = 0
        while stop is None or pos < stop:
            raw = f.readline()
            if not raw:
                return
            lineno += 1
            yield (f"{path}:{lineno}" if start == 0 else f"{path}@{pos}"), raw
            pos += len(raw)


def _read_jsonl_file(path: Path, text_field: str, report: InputReport, start: int = 0,
                     stop: int | None = None) -> Iterator[Document]:
    for origin, raw in _jsonl_lines(path, start, stop):
        if not raw.strip():
            continue
        try:
            record = json.loads(decode_text(raw, origin, report))
        except json.JSONDecodeError as exc:
            report.note("invalid_json", origin, str(exc))
            continue
        text = _record_text(record, text_field, origin, report)
        if text is not None:
            yield Document(text, origin)


def _json_array_elements(path: Path) -> Iterator[tuple[str, Any]]:
    """(origin `path[INDEX]`, value) of each element of the JSON array in `path`, streamed: the buffer
    holds about one element at a time, so a big file is read in bounded memory."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="replace") as f:
        buffer, pos, eof = "", 0, False

        def more(at_least: int = _JSON_CHUNK) -> bool:
            nonlocal buffer, pos, eof
            chunk = f.read(max(at_least, _JSON_CHUNK))
            buffer, pos, eof = buffer[pos:] + chunk, 0, not chunk
            return bool(chunk)

        def next_char() -> str:
            nonlocal pos
            while True:
                while pos < len(buffer) and buffer[pos].isspace():
                    pos += 1
                if pos < len(buffer) or not more():
                    return buffer[pos:pos + 1]

        def invalid(what: str) -> DataError:
            return DataError(f"{path}: not a valid JSON array ({what} after element {index}); fix the file, or "
                             "write one JSON record per line (.jsonl)")

        index = 0
        if next_char() != "[":
            raise invalid("no '['")
        pos += 1
        if next_char() == "]":
            return
        while True:
            next_char()
            while True:  # a value ends before the buffer does (or at the end of the file): retry with more
                try:
                    value, end = decoder.raw_decode(buffer, pos)
                    if end < len(buffer) or eof:
                        break
                except json.JSONDecodeError:
                    if eof:
                        raise invalid("invalid JSON") from None
                if not more(len(buffer) - pos):  # double what is buffered: linear in the element's size
                    eof = True
            yield f"{path}[{index}]", value
            index, pos = index + 1, end
            separator = next_char()
            if separator == "]":
                return
            if separator != ",":
                raise invalid(f"{separator!r} instead of ',' or ']'" if separator else "the end of the file")
            pos += 1


def _read_json_array(path: Path, text_field: str, report: InputReport) -> Iterator[Document]:
    """The elements of a `.json` array as documents: records with `text_field`, or strings."""
    for origin, value in _json_array_elements(path):
        text = value if isinstance(value, str) else _record_text(value, text_field, origin, report)
        if text is not None:
            yield Document(text, origin)


def _read_parquet_file(path: Path, text_field: str, report: InputReport,
                       row_groups: range | None = None) -> Iterator[Document]:
    """The documents of a parquet file, or of its `row_groups` only; origins are `path#rowN` in the file."""
    import pyarrow.parquet as pq  # deferred: only parquet inputs need it

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
                        "choose one with --text-field")
    if row_groups is None:
        row_groups = range(parquet.num_row_groups)
    row = sum(parquet.metadata.row_group(g).num_rows for g in range(row_groups.start))
    for batch in parquet.iter_batches(columns=[text_field], row_groups=list(row_groups)):
        for value in batch.column(0).to_pylist():
            text = _record_text({text_field: value}, text_field, f"{path}#row{row}", report)
            if text is not None:
                yield Document(text, f"{path}#row{row}")
            row += 1


def _listing_sha256(files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class FileSource:
    """Local files (from a file, directory or glob input), read in sorted path order; `.txt` files as
    one document each, or one per line (`txt_documents`)."""

    spec: str
    files: tuple[Path, ...]
    txt_documents: str = "file"

    def describe(self) -> dict[str, Any]:
        by_line = self.txt_documents == "line" and any(p.suffix.lower() == ".txt" for p in self.files)
        return {"input": self.spec, "kind": "files", "files": len(self.files),
                "listing_sha256": _listing_sha256(self.files), **({"txt_documents": "line"} if by_line else {})}

    def documents(self, text_field: str, report: InputReport) -> Iterator[Document]:
        for path in self.files:
            yield from read_file(path, text_field, report, txt_documents=self.txt_documents)


def file_kind(path: Path, txt_documents: str = "file") -> str:
    """How `path` is read: "text" (one document), "lines" (a `.txt` read a document per line), "jsonl",
    "json_array" (a `.json` whose first non-blank character is `[`) or "parquet"."""
    kind = FILE_KINDS[path.suffix.lower()]
    if kind == "text":
        return "lines" if txt_documents == "line" else "text"
    if kind == "json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")  # a byte-order mark, then blanks
        return "json_array" if head.startswith(b"[") else "jsonl"
    return kind


def read_file(path: Path, text_field: str, report: InputReport, part: tuple[str, int, int] | None = None,
              txt_documents: str = "file") -> Iterator[Document]:
    """The documents of one input file, or of one `part` of it: ("bytes", start, stop) of a `.jsonl`
    file or of a `.txt` read by line (whole lines, see `_jsonl_lines`) or ("row_groups", start, stop) of a
    parquet file."""
    kind = file_kind(path, txt_documents)
    lines = part[1:] if part else (0, None)
    if kind == "text":
        return _read_text_file(path, report)
    if kind == "lines":
        return _read_text_lines(path, report, *lines)
    if kind == "jsonl":
        return _read_jsonl_file(path, text_field, report, *lines)
    if kind == "json_array":
        return _read_json_array(path, text_field, report)
    return _read_parquet_file(path, text_field, report, range(*part[1:]) if part else None)


def _dataset_records(dataset: Iterable[dict], name: str, text_field: str,
                     report: InputReport) -> Iterator[Document]:
    for row, record in enumerate(dataset):
        text = _record_text(record, text_field, f"{name}#row{row}", report)
        if text is not None:
            yield Document(text, f"{name}#row{row}")


@dataclass(frozen=True)
class DiskDatasetSource:
    """A directory written by `datasets`' `save_to_disk` (a DatasetDict contributes its `train` split)."""

    path: Path

    def _load(self):
        import datasets  # deferred: importing datasets costs seconds

        loaded = datasets.load_from_disk(str(self.path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{self.path}: dataset has no 'train' split (splits: {', '.join(loaded)})")
            loaded = loaded["train"]
        return loaded

    def describe(self) -> dict[str, Any]:
        return {"input": str(self.path), "kind": "dataset_dir", "fingerprint": self._load()._fingerprint}

    def documents(self, text_field: str, report: InputReport) -> Iterator[Document]:
        dataset = self._load()
        if text_field not in dataset.column_names:
            raise DataError(f"{self.path}: no column {text_field!r} (columns: {', '.join(dataset.column_names)}); "
                            "choose one with --text-field")
        yield from _dataset_records(dataset, str(self.path), text_field, report)


@dataclass(frozen=True)
class HubDatasetSource:
    """A Hugging Face Hub dataset `owner/name[:config]`, streamed from its `train` split (needs network)."""

    name: str
    config: str | None

    def describe(self) -> dict[str, Any]:
        return {"input": self.name + (f":{self.config}" if self.config else ""), "kind": "hub"}

    def documents(self, text_field: str, report: InputReport) -> Iterator[Document]:
        import datasets  # deferred: importing datasets costs seconds

        try:
            dataset = datasets.load_dataset(self.name, self.config, split="train", streaming=True)
        except Exception as exc:  # the hub client raises many types (offline, not found, gated)
            raise DataError(
                f"cannot load Hugging Face dataset {self.name!r} ({type(exc).__name__}: {exc}). It is not a local "
                "path either; without network, download it first or pass local files") from exc
        yield from _dataset_records(dataset, self.name, text_field, report)


def _supported_files(paths: Iterable[Path]) -> list[Path]:
    found: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_KINDS)
        elif path.is_file() and path.suffix.lower() in FILE_KINDS:
            found.add(path)
    return sorted(p.resolve() for p in found)


def resolve_input(spec: str, txt_documents: str = "file") -> Source:
    """Turn one `--input` value into a Source, or raise DataError saying why it cannot be read;
    `txt_documents` says how its `.txt` files are read ("file" or "line")."""
    if spec in NAMED_CORPORA:
        return NamedCorpus(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() not in FILE_KINDS:
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (supported: {', '.join(FILE_KINDS)})")
        return FileSource(spec, (path.resolve(),), txt_documents)
    if path.is_dir():
        if any((path / marker).is_file() for marker in _DATASET_DIR_MARKERS):
            return DiskDatasetSource(path.resolve())
        files = _supported_files([path])
        if not files:
            raise DataError(f"{path}: directory has no {'/'.join(FILE_KINDS)} files")
        return FileSource(spec, tuple(files), txt_documents)
    if glob.has_magic(spec):
        files = _supported_files(Path(p) for p in glob.glob(str(path), recursive=True))
        if not files:
            raise DataError(f"{spec}: glob matches no {'/'.join(FILE_KINDS)} files")
        return FileSource(spec, tuple(files), txt_documents)
    if _HUB_NAME.fullmatch(spec) and path.suffix.lower() not in FILE_KINDS:
        name, _, config = spec.partition(":")
        return HubDatasetSource(name, config or None)
    if "/" not in spec and not path.suffix:
        raise DataError(f"unknown input {spec!r}: not an existing path and not a named corpus "
                        f"(known: {', '.join(NAMED_CORPORA)}); for a Hugging Face dataset give 'owner/name'")
    raise DataError(f"{spec}: no such file or directory")


def resolve_inputs(specs: Iterable[str], txt_documents: str = "file") -> list[Source]:
    """Resolve every input up front, so a typo fails before any work is done."""
    sources = [resolve_input(spec, txt_documents) for spec in specs]
    if not sources:
        raise DataError("no inputs given")
    return sources


def non_empty(documents: Iterable[Document], report: InputReport) -> Iterator[Document]:
    """The documents that have text; empty ones are counted and skipped, too long ones refused."""
    for doc in documents:
        if doc.text:
            report.check_size(len(doc.text), doc.origin)
            yield doc
        else:
            report.note("empty_documents", doc.origin)


def iter_documents(sources: Iterable[Source], text_field: str, report: InputReport) -> Iterator[Document]:
    """All documents of all sources in order; empty documents are counted and skipped."""
    for source in sources:
        yield from non_empty(source.documents(text_field, report), report)
