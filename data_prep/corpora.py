"""Named corpora that need no download: the embedded default for demos and benchmarks.

`python-stdlib` is the running interpreter's standard library: every `.py` source (sorted by path,
without site-packages) followed by the `pydoc` topic texts (`pydoc_data.topics`, sorted by topic).
It is about 30 MB of code and prose, enough to train and exercise a small tokenizer and student.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.documents import Document, InputReport, decode_text

NAMED_CORPORA = ("python-stdlib",)
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@functools.cache
def stdlib_files() -> tuple[Path, ...]:
    """The interpreter's standard library `.py` files, sorted by their path under the stdlib root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts))
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus known by name; only `python-stdlib` exists."""

    name: str

    def describe(self) -> dict[str, Any]:
        files = stdlib_files()
        listing = "".join(f"{p}\0{p.stat().st_size}\n" for p in files)
        return {"input": self.name, "kind": "named", "python": sys.version.split()[0], "files": len(files),
                "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}

    def documents(self, text_field: str, report: InputReport) -> Iterator[Document]:
        from pydoc_data.topics import topics

        root = Path(sysconfig.get_paths()["stdlib"])
        for path in stdlib_files():
            origin = f"{self.name}:{path.relative_to(root).as_posix()}"
            yield Document(decode_text(path.read_bytes(), origin, report), origin)
        for topic in sorted(topics):
            yield Document(topics[topic], f"{self.name}:pydoc_data.topics[{topic}]")
