"""Join the parts of a multi-task `data_prep.shard` run into the one `manifest.json` readers take.

    python -m data_prep.shard merge --out OUT

Every task `OUT/parts/task-NNNNN` must be complete and made like the others (tokenizer, dtype,
options, the same plan of work units), and their units, in task order, must be exactly the plan's.
The merged manifest lists the tasks' shard files where they are (`parts/task-00003/train-00000`):
no token is copied. Because tasks hold contiguous runs of units (see `data_prep.tasks`), the
shards in task order hold the documents in input order, and `first_doc`/`last_doc` are turned into
global indices (each task's are offset by the documents the earlier tasks read), the same numbers a
single run gives. The manifest is written atomically; merging again rewrites the same bytes (a task
that writes again after a merge marks the merged manifest incomplete until the next merge). A
problem names each task concerned and the command that reruns it.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from data_prep.tasks import PARTS_DIR, plan_sha256, task_dir_name
from shd_common.cli import command_parser
from shd_common.manifest import MANIFEST_NAME, DataError, Manifest, load_manifest, write_manifest

_TASK_DIR = re.compile(r"task-(\d{5,})")
# What a task's options["task"] holds that must be the same in every task of one run.
_PLAN_KEYS = ("count", "unit_bytes", "plan_units", "plan_sha256")
_MAX_EXAMPLES = 5  # as InputReport.max_examples
# The options of a task manifest that are its own: its units, and their content fingerprints.
_TASK_OWN = ("task", "content")


def _task_manifests(parts: Path) -> dict[int, Manifest | None]:
    """{task index: its manifest, or None when it has none or an unreadable one} of the task dirs in `parts`."""
    found: dict[int, Manifest | None] = {}
    for path in sorted(parts.iterdir()) if parts.is_dir() else ():
        match = _TASK_DIR.fullmatch(path.name)
        if path.is_dir() and match:
            try:
                found[int(match.group(1))] = load_manifest(path, require_complete=False)
            except DataError:
                found[int(match.group(1))] = None
    return found


def _task_count(out: Path, manifests: dict[int, Manifest | None]) -> int:
    counts: dict[int, list[int]] = {}
    for index, manifest in manifests.items():
        if manifest is not None and "task" in manifest.options:
            counts.setdefault(manifest.options["task"]["count"], []).append(index)
    if not counts:
        raise DataError(f"{out / PARTS_DIR}: no task has written its manifest yet; run the tasks first "
                        "(python -m data_prep.shard ... --task-index K --task-count N for each K, or "
                        "launch/slurm/prep_array.sh), then merge")
    if len(counts) > 1:
        seen = "; ".join(f"--task-count {c}: tasks {_ranges(i)}" for c, i in sorted(counts.items()))
        raise DataError(f"{out / PARTS_DIR}: holds tasks of runs with different --task-count ({seen}); remove the "
                        "parts of the older run, or use a new --out")
    return next(iter(counts))


def _ranges(indices: list[int]) -> str:
    """`1-3,7` for [1, 2, 3, 7]: the form `sbatch --array=` takes."""
    out, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            out.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(out)


def _common(manifest: Manifest) -> tuple[Any, ...]:
    """What must be equal in every task: tokenizer, dtype, options but the task's own (its units and
    their content fingerprints), and the plan."""
    options = {k: v for k, v in manifest.options.items() if k not in _TASK_OWN}
    return manifest.tokenizer, manifest.dtype, options, [manifest.options["task"].get(k) for k in _PLAN_KEYS]


def _problem(out: Path, index: int, manifest: Manifest | None, reference: Manifest) -> tuple[str, bool] | None:
    """What keeps task `index` out of the merge and whether rerunning it needs --overwrite; None if nothing."""
    task_dir = out / PARTS_DIR / task_dir_name(index)
    if manifest is None:
        return f"task {index}: has not run ({task_dir / MANIFEST_NAME} missing or unreadable)", False
    if "task" not in manifest.options or _common(manifest) != _common(reference):
        return (f"task {index}: made with another tokenizer, options or inputs than task "
                f"{reference.options['task']['index']}", True)
    if not manifest.complete:
        return f"task {index}: has not finished", False
    for shard in manifest.shards:
        for path, digest in ((shard.bin_path(task_dir), shard.bin), (shard.idx_path(task_dir), shard.idx)):
            if not path.is_file() or path.stat().st_size != digest.bytes:
                return f"task {index}: {path} is missing or of the wrong size", True
    return None


def _rerun_advice(command: str, tasks: list[int], overwrite: bool) -> str:
    """How to rerun `tasks`, given the run's command without --task-index."""
    command += " --overwrite" if overwrite else ""
    if len(tasks) == 1:
        return f"rerun it: {command} --task-index {tasks[0]}"
    args = shlex.join(shlex.split(command)[3:])  # without `python -m data_prep.shard`
    return (f"rerun each with: {command} --task-index K, for K in {_ranges(tasks)} (on Slurm: sbatch "
            f"--array={_ranges(tasks)} launch/slurm/prep.sbatch {args})")


def _check_tasks(out: Path, manifests: dict[int, Manifest | None], count: int) -> list[Manifest]:
    """The manifests of tasks 0..count-1, or a DataError naming every task that is missing, unfinished or odd."""
    reference = next(m for _, m in sorted(manifests.items()) if m is not None and "task" in m.options)
    problems = {i: _problem(out, i, manifests.get(i), reference) for i in range(count)}
    problems = {i: p for i, p in problems.items() if p is not None}
    extra = sorted(i for i in manifests if i >= count)
    messages = [p for p, _ in problems.values()]
    if extra:
        messages.append(f"{out / PARTS_DIR}: task dirs {_ranges(extra)} are not part of a run of {count} tasks; "
                        "remove them")
    if messages:
        # every task's manifest has the command from its start, except while an --overwrite swaps it in
        command = next((m.stats["rerun"] for m in manifests.values() if m is not None and "rerun" in m.stats),
                       f"python -m data_prep.shard <the tasks' arguments> --task-count {count}")
        advice = ""
        for overwrite in (False, True):
            tasks = [i for i, (_, needs) in problems.items() if needs == overwrite]
            if tasks:
                advice += "; " + _rerun_advice(command, tasks, overwrite)
        raise DataError(f"cannot merge {out}: " + "; ".join(messages) + advice + "; then merge again")
    return [manifests[i] for i in range(count)]


def _merged_report(tasks: list[Manifest]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for task in tasks:
        for kind, entry in task.stats["input"].items():
            into = merged.setdefault(kind, {"count": 0, "first": []})
            into["count"] += entry["count"]
            into["first"] = (into["first"] + entry["first"])[:_MAX_EXAMPLES]
    return dict(sorted(merged.items()))


def merged_manifest(out: Path, tasks: list[Manifest]) -> Manifest:
    """The manifest of `out` that lists the shards of `tasks` (complete and consistent, in task order)."""
    reference = tasks[0]
    keys = [key for task in tasks for key in task.options["task"]["units"]]
    plan = reference.options["task"]
    if len(keys) != plan["plan_units"] or plan_sha256(keys) != plan["plan_sha256"]:
        raise DataError(f"cannot merge {out}: the tasks' work units are not exactly the plan's "
                        f"({len(keys)} listed, {plan['plan_units']} planned); rerun every task with --overwrite")
    shards, offset = [], 0
    for task in tasks:
        prefix = f"{PARTS_DIR}/{task_dir_name(task.options['task']['index'])}/"
        shards += [replace(s, name=prefix + s.name, first_doc=s.first_doc + offset, last_doc=s.last_doc + offset)
                   for s in task.shards]
        offset += task.stats["documents_read"]
    if offset == 0:
        raise DataError(f"cannot merge {out}: no task found any document in the inputs; check --input and "
                        "--text-field")
    splits = list(reference.stats["documents"])
    stats = {"documents": {s: sum(t.stats["documents"][s] for t in tasks) for s in splits},
             "tokens": {s: sum(t.stats["tokens"][s] for t in tasks) for s in splits},
             "input": _merged_report(tasks), "documents_read": offset}
    options = {k: v for k, v in reference.options.items() if k not in _TASK_OWN}
    options["tasks"] = {k: plan[k] for k in _PLAN_KEYS}
    options["content"] = {key: sha for task in tasks for key, sha in task.options.get("content", {}).items()}
    return Manifest(path=out / MANIFEST_NAME, complete=True, tokenizer=reference.tokenizer, dtype=reference.dtype,
                    options=options, shards=tuple(shards), stats=stats)


def merge_tasks(out: Path) -> Manifest:
    """Check the tasks under `out/parts` and write `out/manifest.json` listing their shards; returns it."""
    manifests = _task_manifests(out / PARTS_DIR)
    tasks = _check_tasks(out, manifests, _task_count(out, manifests))
    try:
        current = load_manifest(out, require_complete=False)
    except DataError:
        current = None
    if current is not None and "tasks" not in current.options:
        raise DataError(f"{out / MANIFEST_NAME}: is the output of a run without --task-count, not of these tasks; "
                        "merge into it is refused (move it away, or rerun the tasks with a new --out)")
    manifest = merged_manifest(out, tasks)
    write_manifest(manifest)
    lines = [f"merged {len(tasks)} tasks into {manifest.path} ({manifest.dtype}, {len(manifest.shards)} shards)"]
    lines += [f"  {split}: {documents:,} documents, {manifest.stats['tokens'][split]:,} tokens"
              for split, documents in manifest.stats["documents"].items()]
    print("\n".join(lines), file=sys.stderr)
    return manifest


def merge_main(argv: list[str]) -> None:
    parser = command_parser("python -m data_prep.shard merge", __doc__)
    parser.add_argument("--out", type=Path, required=True, metavar="OUT",
                        help="the --out of the tasks; writes OUT/manifest.json")
    merge_tasks(parser.parse_args(argv).out)
