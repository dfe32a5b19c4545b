"""The study's report moved to ``pipeline.study.report``; this name keeps old imports working."""

from pipeline.study.report import *  # noqa: F401,F403
