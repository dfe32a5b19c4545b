"""Teacher placement (``teacher.placement``) on real multi-rank CPU runs: every placement trains the
same student. Partitioned and replicated do the same arithmetic (the partitioned teacher is
gathered whole before each layer runs), so their losses are bit-identical; the per-node placement
runs on 4 ranks (2 simulated nodes of 2, ZeRO++ hpZ), i.e. another micro-batch split of the same
global batch, so it matches to summation order (1e-6 relative, as the 2 -> 1 rank universal resume)."""

from __future__ import annotations

import pytest

from pipeline.config import config_from_dict
from pipeline.training.deepspeed_config import resolve_placement
from tests.helpers import run_ranks, step_losses, tiny_config

STEPS = 3


def _config(tmp_path, tiny_data, tiny_teacher, name: str, **over) -> dict:
    base = {"optim.max_steps": STEPS, "eval.at_end": False, "checkpoint.save_at_end": False,
            "distill.plan": "select"}
    base.update(over)
    return tiny_config(tmp_path / name, tiny_data, tiny_teacher, **base)


@pytest.mark.multiprocess
def test_every_placement_gives_the_same_losses(tmp_path, tiny_data, tiny_teacher):
    runs = {}
    for name, over in (("partitioned", {}), ("replicated", {"teacher.placement": "replicated"}),
                       ("offloaded", {"teacher.offload_params": True})):
        cfg = _config(tmp_path, tiny_data, tiny_teacher, name, **over)
        runs[name] = step_losses(run_ranks(2, cfg, tmp_path / f"w-{name}"))
        log = (tmp_path / f"w-{name}" / "logs" / "rank0.log").read_text()
        assert f"placement {cfg['teacher'].get('placement', 'partitioned')} (2 ranks, 2 per node" in log
    assert sorted(runs["partitioned"]) == list(range(1, STEPS + 1))
    assert runs["replicated"] == runs["partitioned"]  # bit for bit
    assert runs["offloaded"] == runs["partitioned"]
    assert "offloaded to CPU" in (tmp_path / "w-offloaded" / "logs" / "rank0.log").read_text()
    # the log states what each placement holds and moves (computed from the teacher's size)
    part = (tmp_path / "w-partitioned" / "logs" / "rank0.log").read_text()
    repl = (tmp_path / "w-replicated" / "logs" / "rank0.log").read_text()
    assert "gathered per step per rank 0.0 MiB" in repl and "gathered per step per rank 0.0 MiB" not in part

    cfg = _config(tmp_path, tiny_data, tiny_teacher, "node", **{"teacher.placement": "node",
                                                                 "data.micro_batch_size": 1})
    node = step_losses(run_ranks(4, cfg, tmp_path / "w-node", ranks_per_node=2, timeout=600))
    log = (tmp_path / "w-node" / "logs" / "rank0.log").read_text()
    assert "placement node (4 ranks, 2 per node)" in log and "0.0 MiB of it across nodes" in log
    hpz = next(line for line in log.splitlines() if line.startswith("teacher hpZ:"))
    assert not hpz.startswith("teacher hpZ: 0 of")  # the secondary (per-node) partitions exist
    for s in range(1, STEPS + 1):
        assert node[s] == pytest.approx(runs["partitioned"][s], rel=1e-6)


@pytest.mark.parametrize("placement, world, per_node, kind", [
    ("node", 16, 8, "node"), ("node", 8, 8, "partitioned"), ("node", 4, 1, "replicated"),
    ("replicated", 16, 8, "replicated"), ("partitioned", 16, 8, "partitioned"),
])
def test_placement_resolution_and_traffic(tiny_data, tmp_path, placement, world, per_node, kind):
    cfg = config_from_dict(tiny_config(tmp_path, tiny_data, tmp_path / "t", **{"teacher.placement": placement}))
    pl = resolve_placement(cfg, world, per_node)
    assert pl.kind == kind
    total, across = pl.gathered_bytes_per_forward(16 * 2**30)
    assert across == (0.0 if kind != "partitioned" else 16 * 2**30 * (world - per_node) / world)
    assert (total == 0.0) == (kind == "replicated")
