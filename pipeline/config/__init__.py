"""The run configuration, below every component: the sections (:mod:`pipeline.config.sections`)
and the run config that composes, loads, validates and derives them (:mod:`pipeline.config.run`).

Components import from here and receive validated sections; this package imports no component
(a layer rule checked in CI), so no import circle can run through the config.
"""

from pipeline.config import run, sections
from pipeline.config.run import *  # noqa: F403 -- re-exported: run.__all__
from pipeline.config.sections import *  # noqa: F403 -- re-exported: sections.__all__

__all__ = [*run.__all__, *sections.__all__]
