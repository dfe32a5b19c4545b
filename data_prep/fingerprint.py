"""Content fingerprints of the inputs' work units: an input edited in place is noticed, whatever its size.

`data_prep.shard` records, in its manifest's options, the sha256 of the bytes each work unit reads
(`data_prep.tasks.WorkUnit`: a whole file, a byte range of a `.jsonl` with the tail of its last line,
the row groups of a parquet file); a resumed or "already complete" output is compared with the
input as it is now (`data_prep.output_dir.differences`). A single run fingerprints whole files, a
task of a multi-task run its own units only. Hashing costs one more read of the input; it is skipped
for a unit whose file still has the size and modification time recorded beside its fingerprint in
the output's manifest (stats["fingerprints"]), as the teacher identity does. Inputs that are not
files (a named corpus, a dataset directory, a Hub dataset) keep their listing in options["inputs"].
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from data_prep.documents import Source
from data_prep.output_dir import STAGING_NAME, manifest_or_none
from data_prep.tasks import WorkUnit, plan_units
from shd_common.manifest import Manifest

_CHUNK = 1 << 20


def _row_group_span(path: Path, groups: range) -> tuple[int, int]:
    """The bytes of `path` holding the column chunks of row groups `groups`."""
    import pyarrow.parquet as pq  # deferred: only parquet inputs need it

    metadata = pq.ParquetFile(path).metadata
    starts, stops = [], []
    for g in groups:
        row_group = metadata.row_group(g)
        for c in range(row_group.num_columns):
            column = row_group.column(c)
            start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
            starts.append(start)
            stops.append(start + column.total_compressed_size)
    return (min(starts), max(stops)) if starts else (0, path.stat().st_size)


def _hash_span(path: Path, start: int, stop: int, finish_line: bool) -> str:
    """sha256 of bytes [start, stop) of `path`, and with `finish_line` the rest of the line byte
    stop - 1 is in (a byte range of a `.jsonl` reads its last line to the end)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        last = b"\n"
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
            last = chunk[-1:]
        if finish_line and last != b"\n":
            digest.update(f.readline())
    return digest.hexdigest()


def unit_sha256(unit: WorkUnit) -> str:
    """The sha256 of the bytes `unit` reads (see the module docstring)."""
    assert unit.path is not None
    if unit.kind == "bytes":
        return _hash_span(unit.path, unit.start, unit.stop, finish_line=True)
    if unit.kind == "row_groups":
        return _hash_span(unit.path, *_row_group_span(unit.path, range(unit.start, unit.stop)), finish_line=False)
    return _hash_span(unit.path, 0, unit.path.stat().st_size, finish_line=False)


def file_units(sources: list[Source]) -> list[WorkUnit]:
    """The inputs as whole-file units: a single run is fingerprinted file by file."""
    return plan_units(sources, unit_bytes=sys.maxsize)


def recorded_fingerprints(out: Path) -> dict[str, list]:
    """{unit key: [size, mtime_ns, sha256]} from the manifests in output dir `out` and its staging dir."""
    known: dict[str, list] = {}
    for root in (out, out / STAGING_NAME):
        manifest = manifest_or_none(root)
        if manifest is not None:
            known.update(manifest.stats.get("fingerprints") or {})
    return known


def with_content(fresh: Manifest, units: Iterable[WorkUnit]) -> Manifest:
    """`fresh` with options["content"] = {unit key: sha256} of the file units among `units`, and their
    cache in stats["fingerprints"]; a file unchanged (size, mtime) since the manifest in `fresh`'s
    directory (or its staging dir) recorded it is not hashed again."""
    known = recorded_fingerprints(fresh.root)
    content, cache = {}, {}
    for unit in units:
        if unit.path is None:
            continue
        stat = os.stat(unit.path)
        previous = known.get(unit.key)
        if previous is not None and previous[:2] == [stat.st_size, stat.st_mtime_ns]:
            sha = previous[2]
        else:
            sha = unit_sha256(unit)
        content[unit.key] = sha
        cache[unit.key] = [stat.st_size, stat.st_mtime_ns, sha]
    return replace(fresh, options={**fresh.options, "content": content},
                   stats={**fresh.stats, "fingerprints": cache})
