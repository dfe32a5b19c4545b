"""What every input yields: documents (text and origin), the report of records skipped or repaired
while reading, the protocol a source follows, and UTF-8 decoding that counts what it replaced.

Below the readers (`data_prep.sources`, `data_prep.corpora`, `data_prep.tasks`), which all build on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from shd_common.manifest import DataError


@dataclass(frozen=True)
class Document:
    """One document's text and where it came from (`path`, `path:line`, `name#row`)."""

    text: str
    origin: str


@dataclass
class InputReport:
    """Counts of records skipped or repaired while reading, with the first few origins of each.

    With `strict`, a skipped record (missing text field, invalid JSON) is an error instead.
    """

    strict: bool = False
    max_examples: int = 5
    max_document_bytes: int | None = None  # longer documents are refused (see `check_size`)
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    SKIPPED = ("missing_text_field", "invalid_json")
    HINTS = {"txt_files_read_whole": "each is one document; --txt-documents line reads one document per line"}

    def check_size(self, size: int, origin: str, unit: str = "characters") -> None:
        """Refuse a document of `size` over `max_document_bytes`, naming it, its size and the fixes."""
        if self.max_document_bytes is not None and size > self.max_document_bytes:
            raise DataError(
                f"{origin}: one document of {size:,} {unit} ({size / 2**20:,.1f} MiB), over --max-document-mb "
                f"{self.max_document_bytes / 2**20:g}: tokenizing a text at once takes about 100 times its size in "
                "memory; split it into smaller documents (a .txt with one document per line: --txt-documents "
                "line), or raise --max-document-mb if the memory is there")

    def note(self, kind: str, origin: str, detail: str = "") -> None:
        if self.strict and kind in self.SKIPPED:
            raise DataError(f"{origin}: {kind.replace('_', ' ')}{': ' + detail if detail else ''} (--strict)")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        first = self.examples.setdefault(kind, [])
        if len(first) < self.max_examples:
            first.append(origin)

    def as_dict(self) -> dict[str, Any]:
        return {kind: {"count": n, "first": self.examples[kind]} for kind, n in sorted(self.counts.items())}

    def summary_lines(self) -> list[str]:
        return [f"{kind.replace('_', ' ')}: {n} (first: {', '.join(self.examples[kind])})"
                + (f"; {self.HINTS[kind]}" if kind in self.HINTS else "") for kind, n in sorted(self.counts.items())]


class Source(Protocol):
    """Something that yields documents; `describe()` pins down what was read, for the manifest."""

    def describe(self) -> dict[str, Any]: ...

    def documents(self, text_field: str, report: InputReport) -> Iterator[Document]: ...


def decode_text(raw: bytes, origin: str, report: InputReport) -> str:
    """UTF-8 text; undecodable bytes become U+FFFD and are counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.note("replaced_undecodable_bytes", origin)
        return raw.decode("utf-8", errors="replace")
