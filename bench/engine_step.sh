#!/usr/bin/env bash
# Step time / peak memory of CE vs CE+KD vs CE+KD+SHD on the tiny 2-rank CPU run.
# usage: bash bench/engine_step.sh CONFIG.yaml OUTDIR   (STEPS=30 by default)
set -euo pipefail
cfg=$1; out=$2; steps=${STEPS:-30}
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
common="optim.max_steps=$steps optim.warmup_steps=2 checkpoint.every_steps=0 checkpoint.save_at_end=false eval.at_end=false logging.every_steps=1000"
run() { name=$1; shift; rm -rf $out/$name; python -m torch.distributed.run --nproc_per_node 2 -m pipeline.train --config $cfg output_dir=$out/$name $common "$@" >$out/$name.log 2>&1; }
mkdir -p $out
run ce stage=pretrain teacher.path=null distill.w_ce=1 distill.w_kd=0 distill.w_shd=0
run ce_kd distill.w_shd=0
run ce_kd_shd
python - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
for name in ("ce", "ce_kd", "ce_kd_shd"):
    r = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl") if "loss/total" in l]
    t = [x["perf/step_time_s"] for x in r[5:]]
    print(f"{name:10s} median step {1000*statistics.median(t):7.1f} ms  p90 {1000*sorted(t)[int(.9*len(t))]:7.1f} ms"
          f"  peak RSS rank0 {r[-1]['perf/peak_mem_mib']:.0f} MiB  final loss {r[-1]['loss/total']:.4f}")
PY
