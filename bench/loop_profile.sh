#!/usr/bin/env bash
# The HTTP event loop's host time per streamed token, on the CPU (BENCHMARKS.md, sixteenth session):
#   pip install py-spy && bash bench/loop_profile.sh [TAG]
# A `random:tiny` server with 128 sequences gets 400 streaming requests at once (bench/serve.py). py-spy samples
# every thread for 15 s mid-run. Printed: the samples of each thread, the output rate, the loop's samples per
# 1,000 streamed tokens (lower is better), and the engine thread's prepare phase, which waits for the GIL the
# loop holds. The raw samples land in $OUT/raw-TAG.txt for a per-function breakdown.
set -euo pipefail
TAG=${1:-run}
OUT=${OUT:-/tmp/hotlora-loop}
PORT=${PORT:-8131}
py=${PYTHON:-python3}
here=$(dirname "$0")
mkdir -p "$OUT"
[[ -f $OUT/tok/tokenizer.json ]] || "$py" "$here/serve.py" --make-tokenizer "$OUT/tok" --vocab 49152
HOTLORA_DEVICE=cpu "$py" -m hotlora.server.cli serve --model random:tiny --tokenizer "$OUT/tok" --max-num-seqs 128 \
  --port "$PORT" --log-level warning >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "localhost:$PORT/v1/models" >/dev/null && break; sleep 1; done
"$py" "$here/serve.py" --url "http://127.0.0.1:$PORT" --requests 400 --rate 0 --prompt-len 64:256 \
  --output-len 128:256 --seed 1 >"$OUT/bench-$TAG.json" &
client=$!
sleep 6
py-spy record -p "$server" -d 15 -r 200 -f raw -o "$OUT/raw-$TAG.txt" --threads >/dev/null
wait $client
"$py" - "$OUT" "$TAG" <<'PY'
import collections, json, sys
out, tag = sys.argv[1:]
threads = collections.Counter()
for line in open(f"{out}/raw-{tag}.txt"):
    stack, _, n = line.rstrip().rpartition(" ")
    threads[stack.split(";")[0].split(": ")[-1]] += int(n)
b = json.load(open(f"{out}/bench-{tag}.json"))
tokens = b["output_tok_per_s"] * 15 / 1000
print(json.dumps({"tag": tag, "samples": dict(threads.most_common(3)), "output_tok_per_s": b["output_tok_per_s"],
                  "loop_samples_per_1k_tokens": round(threads["MainThread"] / tokens, 2),
                  "prepare_ms": b["step_phases_ms"]["prepare"]}))
PY
