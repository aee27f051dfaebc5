#!/usr/bin/env bash
# Replicas behind Ray Serve (issue 18): request throughput of 1 and of 2 replicas at matched TPOT p50,
# Llama-3-8B shape (random weights), Zipf(1.1) over 64 r=16 adapters on all projections, adapters in a
# shared S3-compatible store (moto's server on loopback: the GPU machine reaches nothing outside).
# Needs 2 GPUs and `make install` (the dev extra brings ray[serve] and moto[server]). Run from the repo root:
#   bash bench/ray_replicas.sh            # RATES="2 4 6 8 10 12 14 16" REQUESTS=300 OUT=bench-out/ray
# Prints one line per (replicas, rate): req/s, output tok/s, TPOT p50/p99, TTFT p50/p99, errors. The row for
# BENCHMARKS.md: the highest req/s of 2 replicas whose TPOT p50 is <= that of 1 replica at its highest rate,
# divided by 1 replica's req/s there (target >= 1.8).
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${OUT:-bench-out/ray}
RATES=${RATES:-"2 4 6 8 10 12 14 16"}
REQUESTS=${REQUESTS:-300}
MODEL=${MODEL:-random:llama-3-8b}
S3=http://127.0.0.1:5555
mkdir -p "$OUT"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1 HOTLORA_ADMIN_TOKEN=bench

"$BIN/moto_server" -H 127.0.0.1 -p 5555 >"$OUT/moto.log" 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null || true' EXIT
sleep 3
"$BIN/python" -c "import boto3; boto3.client('s3', endpoint_url='$S3').create_bucket(Bucket='hotlora-bench')"
[ -d "$OUT/adapters" ] || "$BIN/python" bench/make_adapters.py --out "$OUT/adapters" --count 64 --rank 16 \
    --targets all --model "$MODEL"
ADAPTERS=$("$BIN/python" bench/serve.py --list-adapters "$OUT/adapters")

for N in 1 2; do
    "$BIN/hotlora" serve-ray --replicas "$N" --model "$MODEL" --adapter-store "s3://hotlora-bench/a" \
        --s3-endpoint-url "$S3" --max-loras 32 --max-lora-rank 16 --host 127.0.0.1 --port 8000 \
        --replica-host 127.0.0.1 --replica-port 8100 >"$OUT/serve-ray-$N.log" 2>&1 &
    SERVE=$!
    until [ "$(curl -sf http://127.0.0.1:8000/-/replicas | "$BIN/python" -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null)" = "$N" ]; do
        sleep 5
    done
    if [ "$N" = 1 ]; then  # the store outlives the runs: upload once
        for d in "$OUT"/adapters/*/; do
            "$BIN/hotlora" adapters upload "$(basename "$d")" "$d" --url http://127.0.0.1:8000 >/dev/null
        done
    fi
    for R in $RATES; do
        "$BIN/python" bench/serve.py --url http://127.0.0.1:8000 --requests "$REQUESTS" --rate "$R" \
            --prompt-len 64:1024 --output-len 32:256 --adapters "$ADAPTERS" --zipf 1.1 \
            --out "$OUT/replicas$N-rate$R.json" >/dev/null
    done
    kill -INT "$SERVE"
    wait "$SERVE" || true
    "$BIN/ray" stop --force >/dev/null 2>&1 || true
done

"$BIN/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("replicas*-rate*.json"), key=lambda p: (p.name.split("-")[0], float(p.stem.split("rate")[1]))):
    r = json.loads(f.read_text())
    t, f50 = r["tpot_ms"], lambda d, k: d.get(k) or float("nan")
    print(f"{f.stem:22s} req/s {r['req_per_s']:7.2f}  out tok/s {r['output_tok_per_s']:8.0f}  "
          f"TPOT p50 {f50(t, 'p50'):7.1f} p99 {f50(t, 'p99'):7.1f}  "
          f"TTFT p50 {f50(r['ttft_ms'], 'p50'):7.0f} p99 {f50(r['ttft_ms'], 'p99'):7.0f}  errors {r['errors']}")
PY
