"""The state of a shard output directory: continue it, start it over, or replace it through staging.

`python -m data_prep.shard` writes into ``--out`` directly when it is new, empty or holds an
incomplete output made the same way (resumed); ``--overwrite`` of a complete output builds the new
one in ``--out/.overwrite-staging`` and swaps it in only when complete (`swap_in`), so a kill at
any point leaves either the old output or a state the same command finishes. Only files this tool
writes (manifest, split shards) are ever removed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from data_prep.tasks import describe_unit
from shd_common.integrity import TMP_SUFFIX, fsync_dir
from shd_common.manifest import MANIFEST_NAME, SPLITS, DataError, Manifest, load_manifest, write_manifest

# Where --overwrite builds the new output, inside --out (so on the same filesystem), until it is complete.
STAGING_NAME = ".overwrite-staging"
#: The manifest options that describe the input (the rest are the options of the command).
INPUT_KEYS = ("inputs", "content")


def differences(old: Manifest, fresh: Manifest) -> list[str]:
    """What differs between the recipes of two manifests (none: the same output): "tokenizer",
    "dtype", "options (KEY, ...)" and "input" (see `input_changes`)."""
    found = [name for name in ("tokenizer", "dtype") if getattr(old, name) != getattr(fresh, name)]
    keys = sorted((set(old.options) | set(fresh.options)) - set(INPUT_KEYS) - {"separator"})
    changed = [key for key in keys if old.options.get(key) != fresh.options.get(key)]
    if separator_id(old) != separator_id(fresh):
        changed.append("separator")
    if changed:
        found.append(f"options ({', '.join(changed)})")
    if input_changes(old, fresh):
        found.append("input")
    return found


def separator_id(manifest: Manifest) -> int:
    """The id ending every document; outputs made before `--separator` existed recorded none and used EOS."""
    separator = manifest.options.get("separator")
    return separator["id"] if separator else manifest.tokenizer.eos_id


def input_changes(old: Manifest, fresh: Manifest) -> list[str]:
    """How the input differs between two manifests, one phrase per work unit (content fingerprints,
    `data_prep.fingerprint`) or for the listing of the inputs. A manifest written before fingerprints
    existed is compared by its listing only (paths and sizes)."""

    if "content" not in old.options:
        return [] if old.options.get("inputs") == fresh.options.get("inputs") else ["the input files or their sizes"]
    before, now = old.options["content"], fresh.options.get("content", {})
    changes = [f"{describe_unit(key)}: {'content changed' if key in now else 'no longer an input'}"
               for key in before if before[key] != now.get(key)]
    changes += [f"{describe_unit(key)}: new input" for key in now if key not in before]
    if not changes and old.options.get("inputs") != fresh.options.get("inputs"):
        changes.append("the inputs that are not files (named corpus, dataset) or their listing")
    return changes


def manifest_or_none(root: Path) -> Manifest | None:
    """The manifest in `root`, or None when it has none or an unreadable one."""
    try:
        return load_manifest(root, require_complete=False)
    except DataError:
        return None


def check_resumable(old: Manifest, fresh: Manifest) -> None:
    """Raise unless `old` was made like `fresh` and every shard it lists is on disk at its size."""
    root = old.root
    differs = [name for name in differences(old, fresh) if name != "input"]
    if differs:
        raise DataError(f"{root}: holds shards made with a different {' and '.join(differs)}; pass --overwrite "
                        "to replace them, or choose another --out")
    changed = input_changes(old, fresh)
    if changed:
        shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise DataError(f"{root}: the input changed since these shards were written ({shown}); pass --overwrite "
                        "to rebuild them from the input as it is now (the old output stays until the new one is "
                        "complete), or restore the input")
    for shard in old.shards:
        for path, digest in ((shard.bin_path(root), shard.bin), (shard.idx_path(root), shard.idx)):
            if not path.is_file() or path.stat().st_size != digest.bytes:
                raise DataError(f"{path}: listed in the manifest but missing or of the wrong size; "
                                "pass --overwrite to start over")


def resumable(fresh: Manifest, overwrite: bool) -> Manifest | None:
    """The manifest already in `fresh.root` to continue from, or None to start over.

    Without `overwrite` a manifest that cannot be continued is an error; with it, that directory is
    started over (callers pass `overwrite` only for a directory that holds no complete output).
    """
    if not fresh.path.is_file():
        return None
    try:
        old = load_manifest(fresh.root, require_complete=False)
        check_resumable(old, fresh)
    except DataError:
        if overwrite:
            return None
        raise
    return old


def prepare_dir(fresh: Manifest, overwrite: bool) -> Manifest:
    """The manifest to continue from in `fresh.root`: the matching one already there (resume), or `fresh`."""
    root = fresh.root
    old = resumable(fresh, overwrite)
    if old is not None:
        remove_files(root, lambda p: p.name.endswith(TMP_SUFFIX))
        return old
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise DataError(f"{root}: exists, is not empty and has no {MANIFEST_NAME}; choose an empty or new --out "
                        "(or --overwrite to replace shard files in it)")
    root.mkdir(parents=True, exist_ok=True)
    remove_files(root, is_ours)
    write_manifest(fresh)
    return fresh


def build_root(out: Path, overwrite: bool, fresh: Manifest) -> Path:
    """Where to write: --out itself, or its staging directory when a complete output must be kept meanwhile.

    Staging is used by --overwrite of a complete output, and to finish a swap a kill cut short (--out
    then holds the incomplete manifest `swap_in` writes first, made like the complete staged one).
    """
    staging = out / STAGING_NAME
    current, staged = manifest_or_none(out), manifest_or_none(staging)
    if overwrite and current is not None and current.complete:
        return staging
    if (staged is not None and staged.complete and not differences(staged, fresh)
            and current is not None and not differences(current, fresh)):
        return staging
    if staging.is_dir() and overwrite:
        remove_staging(staging)  # left by another --overwrite command: this one replaces --out in place
    elif staging.is_dir():
        print(f"note: {staging} is left from an interrupted --overwrite run and is not part of the output; "
              "rerun that command to finish it, or delete the directory", file=sys.stderr)
    return out


def swap_in(staged: Manifest, out: Path) -> Manifest:
    """Replace the output in `out` by the complete one in the staging directory; returns its manifest there.

    Steps: (1) mark `out` incomplete, so readers refuse it from here on and say to rerun the command;
    (2) delete our old files that the new output does not reuse by name; (3) move each new shard file
    in (a rename, replacing an old file of the same name); (4) move the staged manifest in, which
    makes `out` complete again; (5) remove the staging directory. Every step can be repeated, so
    after a kill the same command (see `build_root`) finishes the swap; files we did not write stay.
    """
    staging = staged.root
    final = replace(staged, path=out / MANIFEST_NAME)
    write_manifest(replace(final, complete=False, shards=(), stats={}))
    new_files = {path.name for shard in staged.shards for path in (shard.bin_path(out), shard.idx_path(out))}
    remove_files(out, lambda p: is_ours(p) and p.name != MANIFEST_NAME and p.name not in new_files)
    for name in sorted(new_files):
        if (staging / name).is_file():
            os.replace(staging / name, out / name)
    fsync_dir(out)
    os.replace(staged.path, final.path)
    fsync_dir(out)
    remove_staging(staging)
    return final


def remove_staging(staging: Path) -> None:
    """Delete the staging directory: our files in it, then the directory (which fails if anything else is left)."""
    remove_files(staging, is_ours)
    staging.rmdir()


def is_ours(path: Path) -> bool:
    name = path.name.removesuffix(TMP_SUFFIX)
    return name == MANIFEST_NAME or (name.split("-")[0] in SPLITS and name.endswith((".bin", ".idx")))


def remove_files(out: Path, which: Callable[[Path], bool]) -> None:
    for path in out.iterdir():
        if path.is_file() and which(path):
            path.unlink()
