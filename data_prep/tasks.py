"""Work units and their assignment to the tasks of a multi-node `data_prep.shard` run (a Slurm array).

The inputs are cut into work units in input document order: a whole file; a JSON Lines file (or a
`.txt` read a document per line) larger than `unit_bytes` by byte ranges of `unit_bytes` (each line
belongs to the range its first byte is in, see `sources._jsonl_lines`); a parquet file by runs of row
groups of about `unit_bytes`; a non-file input (named corpus, dataset directory, Hub dataset) whole.
A `.txt` file read as one document and a `.json` array are never cut. Tasks get contiguous runs of
units balanced by bytes, so task 0's documents come first, then task 1's, and so on: the tasks'
outputs, concatenated in task order, hold the documents in the same order as a single run. Both steps
depend only on the inputs (file sizes, parquet metadata) and the task count, so every task computes the
same plan on its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_prep.documents import Document, InputReport, Source
from data_prep.sources import FileSource, file_kind, non_empty, read_file

PARTS_DIR = "parts"


def task_dir_name(index: int) -> str:
    """`task-00017`: the directory under `OUT/parts/` that task 17 writes."""
    return f"task-{index:05d}"


@dataclass(frozen=True)
class WorkUnit:
    """Part of one input: `source` is its index in the inputs; `start`/`stop` are bytes (`kind` "bytes")
    or row groups (`kind` "row_groups") of `path`, unused for a whole file or non-file source."""

    source: int
    path: Path | None
    kind: str  # "whole", "bytes" or "row_groups"
    start: int
    stop: int
    weight: int  # bytes, for balancing the tasks

    @property
    def key(self) -> str:
        """A stable name of the unit, listed in the task manifests so that a merge can check coverage."""
        return f"{self.source}:{self.path or '-'}:{self.kind}:{self.start}-{self.stop}"

    def documents(self, sources: list[Source], text_field: str, report: InputReport) -> Iterator[Document]:
        """The unit's non-empty documents, streamed, in input order."""
        if self.path is None:
            docs = sources[self.source].documents(text_field, report)
        else:
            docs = read_file(self.path, text_field, report,
                             None if self.kind == "whole" else (self.kind, self.start, self.stop),
                             sources[self.source].txt_documents)
        return non_empty(docs, report)


def _file_units(source: int, path: Path, unit_bytes: int, txt_documents: str) -> list[WorkUnit]:
    size = path.stat().st_size
    kind = file_kind(path, txt_documents)
    if kind in ("jsonl", "lines") and size > unit_bytes:
        return [WorkUnit(source, path, "bytes", start, min(start + unit_bytes, size), min(unit_bytes, size - start))
                for start in range(0, size, unit_bytes)]
    if kind == "parquet":
        return _parquet_units(source, path, unit_bytes)
    return [WorkUnit(source, path, "whole", 0, 0, size)]


def _parquet_units(source: int, path: Path, unit_bytes: int) -> list[WorkUnit]:
    """Runs of consecutive row groups of at least `unit_bytes` (uncompressed), the last one shorter."""
    import pyarrow.parquet as pq  # deferred: only parquet inputs need it

    metadata = pq.ParquetFile(path).metadata
    units, start, weight = [], 0, 0
    for group in range(metadata.num_row_groups):
        weight += metadata.row_group(group).total_byte_size
        if weight >= unit_bytes or group == metadata.num_row_groups - 1:
            units.append(WorkUnit(source, path, "row_groups", start, group + 1, weight))
            start, weight = group + 1, 0
    return units or [WorkUnit(source, path, "whole", 0, 0, path.stat().st_size)]


def plan_units(sources: list[Source], unit_bytes: int) -> list[WorkUnit]:
    """Every work unit of the inputs, in input document order."""
    units: list[WorkUnit] = []
    for index, source in enumerate(sources):
        if isinstance(source, FileSource):
            for path in source.files:
                units += _file_units(index, path, unit_bytes, source.txt_documents)
        else:
            units.append(WorkUnit(index, None, "whole", 0, 0, unit_bytes))  # size unknown: count as one unit
    return units


def describe_unit(key: str) -> str:
    """A unit key (`source:path:kind:start-stop`) as a person reads it: the path, and its part."""
    _, rest = key.split(":", 1)
    path, kind, span = rest.rsplit(":", 2)
    return path if kind == "whole" else f"{path} ({kind.replace('_', ' ')} {span})"


def plan_sha256(keys: list[str]) -> str:
    """A digest of unit keys in order: equal for the whole plan and the tasks' lists concatenated."""
    return hashlib.sha256("".join(key + "\n" for key in keys).encode()).hexdigest()


def assign_units(units: list[WorkUnit], task_count: int) -> list[list[WorkUnit]]:
    """Contiguous runs of units, one per task, of about equal bytes: a unit goes to the task whose
    share of the total bytes holds the unit's midpoint (some tasks get none when units are few)."""
    total = max(sum(u.weight for u in units), 1)
    tasks: list[list[WorkUnit]] = [[] for _ in range(task_count)]
    before = 0
    for unit in units:
        tasks[min(task_count - 1, (2 * before + unit.weight) * task_count // (2 * total))].append(unit)
        before += unit.weight
    return tasks
