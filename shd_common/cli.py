"""The argument parser of every command (``python -m pipeline.X``, ``python -m data_prep.X``).

One place for the command-line contract the commands share: an abbreviated flag is an error, never
a guess (argparse would read ``--resum none`` as ``--resume none``, ``--overwr`` as ``--overwrite``),
also in sub-commands; the description is the first paragraph of the command's docstring.
"""

from __future__ import annotations

import argparse
from typing import Any


class StrictParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that refuses abbreviated flags; its sub-command parsers are StrictParsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def command_parser(prog: str, doc: str | None, **kwargs: Any) -> StrictParser:
    """The parser of command ``prog`` (as typed, e.g. ``python -m pipeline.train``), described by the
    first paragraph of ``doc`` (its module docstring)."""
    return StrictParser(prog=prog, description=(doc or "").split("\n\n")[0], **kwargs)
