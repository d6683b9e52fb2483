#!/usr/bin/env bash
# The full-size benchmark on one CUDA GPU, every variant docs/benchmark.md's GPU section needs, JSON per run in $OUT.
#   OUT=results bash bench/run_full_gpu.sh
# Each run: one FLOP-count iteration, one warm-up, three measured (about 1-2 minutes each on an H100/H200).
set -u
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
PY=${PYTHON:-python}
run() {  # name, then bench flags
  local name=$1; shift
  echo "== $name: $*" >&2
  timeout 900 "$PY" bench/bench_spo.py --size full --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1 \
    || echo "   $name failed (rc $?), see $OUT/$name.log" >&2
}
run fp16_vs_reference --emulate-reference --dtype fp16 --predict
run bf16_vs_reference --emulate-reference --dtype bf16
run fp16_compile --compile --dtype fp16
run fp16_channels_last --dtype fp16 --channels-last
run fp16_judge_fp32_no_tf32 --dtype fp16 --no-tf32
run fp16_judge_bf16 --dtype fp16 --judge-dtype bf16
run fp16_24gb --dtype fp16 --config configs/sd15_spo_24gb.yaml --memory-cap-gb 24 --predict
run fp16_24gb_plain_config --dtype fp16 --memory-cap-gb 24
run sdxl_fp16 --family sdxl --dtype fp16 --predict
run sdxl_fp16_24gb --family sdxl --dtype fp16 --config configs/sdxl_spo_24gb.yaml --memory-cap-gb 24 --predict
run sdxl_fp16_vs_reference --family sdxl --emulate-reference --dtype fp16
run lpo_vs_spo_fp16 --algorithm both --dtype fp16 --predict
run sdxl_lpo_vs_spo_fp16 --family sdxl --algorithm both --dtype fp16
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for f in sorted(out.glob("*.json")):
    for r in json.loads(f.read_text())["runs"]:
        print(f"{f.stem:28s} {r['mode']:20s} s/it={r.get('seconds_per_iteration', float('nan')):.2f} "
              f"tuples/s={r.get('tuples_per_second', float('nan')):.2f} peak={r.get('fraction_of_peak', float('nan')):.2f} "
              f"alloc={r.get('peak_allocated_gb', float('nan')):.1f}GB reserved={r.get('peak_reserved_gb', float('nan')):.1f}GB fits={r.get('fits')}")
        if "prediction" in r:  # spotune plan's prediction of the same run, beside the measurement
            p = r["prediction"]
            print(f"{'':28s} {'predicted':20s} s/it={p.get('seconds_per_iteration') or float('nan'):.2f} "
                  f"alloc={p['peak_gib']:.1f}GB (in {p['peak_phase']})")
PY
