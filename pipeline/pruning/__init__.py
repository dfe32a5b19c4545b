"""Structured pruning of a teacher into a student (Minitron: Muralidharan et al. 2024, "Compact
Language Models via Pruning and Knowledge Distillation").

`python -m pipeline.prune` runs the steps of this package in order:

1. `shape`: the student's shape from the command line (an axis left out keeps the teacher's size),
   checked against the teacher's config before any weight loads;
2. `importance`: one calibration pass of the frozen teacher over training shards, whose forward
   hooks add up, per batch, the importance of every layer, attention head, MLP neuron and embedding
   channel (nothing is kept across batches but those sums);
3. `choice`: what to keep on each axis (GQA-valid: every kept query head keeps its own kv head);
4. `slicing`: the student's weights as slices of the teacher's, in a model of the teacher's class;
5. `record`: `pruning.json`, the student's provenance (teacher and data identity, options, the
   teacher layer and head each student layer and head comes from), which distillation reads.
"""

from __future__ import annotations

from .choice import LayerChoice, PruneChoice, choose
from .importance import Importance, calibrate, calibration_batches, calibration_reader
from .record import RECORD_NAME, read_record
from .shape import PRUNABLE, StudentShape, resolve_shape, student_config
from .slicing import build_student, student_state_dict

__all__ = ["Importance", "LayerChoice", "PRUNABLE", "PruneChoice", "RECORD_NAME", "StudentShape", "build_student",
           "calibrate", "calibration_batches", "calibration_reader", "choose", "read_record", "resolve_shape",
           "student_config", "student_state_dict"]
