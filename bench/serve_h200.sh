#!/usr/bin/env bash
# The serving runs behind BENCHMARKS.md's H200 tables (issues 11, 12, 13), one suite per argument:
#   bench/serve_h200.sh traffic     # issue 11: Poisson 6 req/s and all-at-once, base and Zipf(1.1) over 128 r=16
#                                   # adapters; then issue 13's shared-prefix run (caching on, the default)
#   bench/serve_h200.sh zipf-prefix # the Poisson Zipf(1.1)-over-128 run and the shared-prefix run (caching on)
#   bench/serve_h200.sh prefix-off  # issue 13: the shared-prefix run with --no-enable-prefix-caching
#   bench/serve_h200.sh prefix-pair # issue 13: the shared-prefix run with caching on, then off (two servers)
#   bench/serve_h200.sh prefix-on-32 / prefix-off-32  # one half of prefix-pair
#   bench/serve_h200.sh many        # issue 12: Zipf(1.1) over 8 vs 1,000 r=8 q/v/o adapters, same Poisson rate
#   bench/serve_h200.sh prefix-steady # prefix-on-32's run, then steady's two, on one server
#   bench/serve_h200.sh steady      # only the profile suite's two steady batch-32 decode runs
#   bench/serve_h200.sh saturation  # the profile suite without its Poisson run
#   bench/serve_h200.sh burst       # only its two all-at-once runs (burst-base: the base model's alone)
#   bench/serve_h200.sh prefix-burst # issue 13's caching-on run and the all-at-once run over 128 adapters
#   bench/serve_h200.sh profile     # issue 11: where a step's time goes (step_phases_ms, host_share): steady
#                                   # decode at batch 32 (prompt 128, 256 tokens each), base and over 32 adapters,
#                                   # then the Poisson Zipf(1.1)-over-128 run and the all-at-once (saturation) runs
# Every run first sends short untimed requests (--warmup) over the most popular adapters: the first
# compilations and those adapters' loads stay out of the numbers, and runs on fresh servers compare fairly.
# Issue 13's run: 8 shared 1,024-token system prompts + 64-256 tokens, Zipf(1.1) over 32 adapters, Poisson,
# after the workload's own first 256 requests (untimed): the cache of a server in steady state.
# Llama-3-8B shape (random weights), NF4, on the local GPU. Each server is started here and polled until ready,
# so the startup (weights, CUDA-graph capture) is not in the numbers; a word-level tokenizer of the model's
# vocabulary (bench/serve.py --make-tokenizer) makes every sampled id stream text. JSON lands in $OUT (default .).
# SERVE_EXTRA: more server arguments for every server of the suite (e.g. "--max-num-seqs 128").
set -euo pipefail
OUT=${OUT:-.}
ADAPTERS=${ADAPTERS:-/tmp/hotlora-bench}
PORT=${PORT:-8123}
REQUESTS=${REQUESTS:-300}
RATE=${RATE:-6}
MODEL=${MODEL:-random:llama-3-8b}
here=$(dirname "$0")
py=${PYTHON:-python3}

make_adapters() {  # dir count rank targets
  [[ -f $1/.done ]] && return
  "$py" "$here/make_adapters.py" --out "$1" --count "$2" --rank "$3" --targets "$4" --model "$MODEL"
  touch "$1/.done"
}

bench() {  # name, then bench/serve.py arguments
  local name=$1; shift
  echo "== $name $(date +%T)" >&2
  rm -f "$OUT/serve-$name.json"  # a failed run must not leave an older run's numbers to be printed as its own
  "$py" "$here/serve.py" --url "http://127.0.0.1:$PORT" --out "$OUT/serve-$name.json" "$@" >/dev/null ||
    { echo "FAILED: $name" >&2; return 1; }
  "$py" -c 'import json,sys; r=json.load(open(sys.argv[1])); s=r["server"]
print(sys.argv[2], r["completed"], "/", r["requests"], "req/s", r["req_per_s"], "tok/s", r["output_tok_per_s"],
      "ttft", r["ttft_ms"], "tpot", r["tpot_ms"], "itl", r["itl_ms"], "eager", s.get("eager_steps"),
      "graph", s.get("graph_steps"), "hit", round(s.get("prefix_cache_hit_rate", 0), 3),
      "loads", s.get("adapter_loads"), "blocked", s.get("steps_blocked_on_adapters"),
      "gc full", s.get("gc2_c"), "in", s.get("gc2_s"), "s", flush=True)
print("  step", r.get("step_ms"), "ms,", r.get("step_tokens_mean"), "tok; ms/step", r.get("step_phases_ms"),
      "host_share", r.get("host_share"), flush=True)
print("  ttft parts ms p50/p99/mean:", *(k + " " + "/".join(str(v[q]) for q in ("p50", "p99", "mean"))
      for k, v in r.get("ttft_parts_ms", {}).items()), flush=True)' \
    "$OUT/serve-$name.json" "$name"
}

serve_and_run() {  # "serve args" then the functions that issue the bench calls
  local args="$1 --tokenizer $ADAPTERS/tokenizer ${SERVE_EXTRA:-}" body=$2; shift
  [[ -f $ADAPTERS/tokenizer/tokenizer.json ]] || "$py" "$here/serve.py" --make-tokenizer "$ADAPTERS/tokenizer"
  "$py" -m hotlora.server.cli serve $args --host 127.0.0.1 --port "$PORT" --log-level warning \
    >"$OUT/server-$body.log" 2>&1 &
  local pid=$!
  local t0=$SECONDS
  until "$py" -c 'import httpx,sys; sys.exit(httpx.get(sys.argv[1], timeout=2).status_code != 200)' \
      "http://127.0.0.1:$PORT/ready" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { tail -30 "$OUT/server-$body.log"; return 1; }
    sleep 1
  done
  echo "server ready in $((SECONDS - t0)) s: $args" >&2
  for f in "$@"; do "$f" || FAILED=1; done  # the other runs go on; the suite's exit status says one failed
  kill -TERM $pid; wait $pid || true
}

names() { "$py" "$here/serve.py" --list-adapters "$1" | cut -d, -f"1-$2"; }
COMMON=(--requests "$REQUESTS" --prompt-len 64:1024 --output-len 32:256)

zipf128_run() {
  bench poisson-zipf128 "${COMMON[@]}" --rate "$RATE" --adapters "$(names "$ADAPTERS/r16all" 128)" --zipf 1.1 \
    --warmup 64
}

traffic_runs() {
  bench poisson-base "${COMMON[@]}" --rate "$RATE" --warmup 8
  zipf128_run
  bench burst-base --requests 240 --prompt-len 64:1024 --output-len 32:256 --rate 0 --warmup 8
  bench burst-zipf128 --requests 240 --prompt-len 64:1024 --output-len 32:256 --rate 0 \
    --adapters "$(names "$ADAPTERS/r16all" 128)" --zipf 1.1 --warmup 64
}

many_runs() {
  bench zipf8 "${COMMON[@]}" --rate "$RATE" --adapters "$(names "$ADAPTERS/r8qvo" 8)" --zipf 1.1 --warmup 8
  bench zipf1000 "${COMMON[@]}" --rate "$RATE" --adapters "$(names "$ADAPTERS/r8qvo" 1000)" --zipf 1.1 --warmup 64
}

steady_runs() {  # 32 requests at once, equal lengths: after their prefill every step decodes all 32
  local steady=(--requests 32 --rate 0 --prompt-len 128:128 --output-len 256:256)
  bench steady-base "${steady[@]}" --warmup 8
  bench steady-32ad "${steady[@]}" --adapters "$(names "${ADAPTERS_STEADY:-$ADAPTERS/r16all}" 32)" --warmup 32
}

burst_base() { bench burst-base --requests 240 --prompt-len 64:1024 --output-len 32:256 --rate 0 --warmup 8; }

burst_zipf128() {
  bench burst-zipf128 --requests 240 --prompt-len 64:1024 --output-len 32:256 --rate 0 \
    --adapters "$(names "$ADAPTERS/r16all" 128)" --zipf 1.1 --warmup 64
}

burst_runs() {  # saturation: 240 requests at once, base and Zipf(1.1) over 128 adapters
  burst_base
  burst_zipf128
}

saturation_runs() {
  steady_runs
  burst_runs
}

profile_runs() {
  steady_runs
  zipf128_run
  burst_runs
}

# steady state: the workload's own first 256 requests go first, untimed (the same for caching on and off)
prefix_args=(--requests "$REQUESTS" --rate "$RATE" --shared-prefixes 8 --prefix-len 1024 --prompt-len 64:256
             --output-len 32:256 --zipf 1.1 --warmup-workload 256)
prefix_on() { bench prefix-on "${prefix_args[@]}" --adapters "$(names "$PREFIX_ADAPTERS" 32)"; }
prefix_off() { bench prefix-off "${prefix_args[@]}" --adapters "$(names "$PREFIX_ADAPTERS" 32)"; }
PREFIX_ADAPTERS=$ADAPTERS/r16all

case ${1:-} in
  traffic)
    make_adapters "$ADAPTERS/r16all" 128 16 all
    serve_and_run "--model $MODEL --adapter-dir $ADAPTERS/r16all --max-loras 64" traffic_runs prefix_on ;;
  many)
    make_adapters "$ADAPTERS/r8qvo" 1000 8 q,v,o
    # no prefix caching: both runs draw the same prompts (one seed), and the second would hit the first's
    serve_and_run "--model $MODEL --adapter-dir $ADAPTERS/r8qvo --max-loras 64 --no-enable-prefix-caching" many_runs ;;
  zipf-prefix)
    make_adapters "$ADAPTERS/r16all" 128 16 all
    serve_and_run "--model $MODEL --adapter-dir $ADAPTERS/r16all --max-loras 64" zipf128_run prefix_on ;;
  prefix-off)
    make_adapters "$ADAPTERS/r16all" 128 16 all
    serve_and_run "--model $MODEL --adapter-dir $ADAPTERS/r16all --max-loras 64 --no-enable-prefix-caching" prefix_off ;;
  prefix-pair|prefix-on-32|prefix-off-32)  # issue 13's matched pair, or one half of it, on 32 adapters of their
    # own (quicker to write than 128)
    PREFIX_ADAPTERS=$ADAPTERS/r16x32
    make_adapters "$PREFIX_ADAPTERS" 32 16 all
    [[ $1 == prefix-off-32 ]] || serve_and_run "--model $MODEL --adapter-dir $PREFIX_ADAPTERS --max-loras 64" prefix_on
    [[ $1 == prefix-on-32 ]] ||
      serve_and_run "--model $MODEL --adapter-dir $PREFIX_ADAPTERS --max-loras 64 --no-enable-prefix-caching" prefix_off ;;
  steady)  # only the two steady batch-32 decode runs of the profile suite, on 32 adapters of their own
    make_adapters "$ADAPTERS/r16x32" 32 16 all
    ADAPTERS_STEADY=$ADAPTERS/r16x32 serve_and_run "--model $MODEL --adapter-dir $ADAPTERS/r16x32 --max-loras 64" \
      steady_runs ;;
  prefix-steady)  # one server: issue 13's caching-on run, then the two steady batch-32 decode runs (A/B of an
    # engine switch through SERVE_EXTRA, two servers' worth in one)
    make_adapters "$ADAPTERS/r16x32" 32 16 all
    PREFIX_ADAPTERS=$ADAPTERS/r16x32; ADAPTERS_STEADY=$ADAPTERS/r16x32
    serve_and_run "--model $MODEL --adapter-dir $ADAPTERS/r16x32 --max-loras 64" prefix_on steady_runs ;;
  burst-base)  # only the all-at-once run on the base model
    serve_and_run "--model $MODEL --max-loras 64" burst_base ;;
  prefix-burst)  # the mixed-step-heavy runs over adapters, one server: issue 13's (caching on), then the
    # all-at-once run over 128 adapters
    make_adapters "$ADAPTERS/r16all" 128 16 all
    serve_and_run "--model $MODEL --adapter-dir $ADAPTERS/r16all --max-loras 64" prefix_on burst_zipf128 ;;
  burst)  # only the all-at-once runs
    make_adapters "$ADAPTERS/r16all" 128 16 all
    serve_and_run "--model $MODEL --adapter-dir $ADAPTERS/r16all --max-loras 64" burst_runs ;;
  saturation)  # the profile suite without its Poisson run: steady batch-32 decode, then the all-at-once runs
    make_adapters "$ADAPTERS/r16all" 128 16 all
    serve_and_run "--model $MODEL --adapter-dir $ADAPTERS/r16all --max-loras 64" saturation_runs ;;
  profile)
    make_adapters "$ADAPTERS/r16all" 128 16 all
    serve_and_run "--model $MODEL --adapter-dir $ADAPTERS/r16all --max-loras 64" profile_runs ;;
  adapters)  # only write the adapter folders (e.g. in the background while something else runs)
    make_adapters "$ADAPTERS/r16all" 128 16 all
    make_adapters "$ADAPTERS/r8qvo" 1000 8 q,v,o ;;
  *) echo "usage: $0 traffic|zipf-prefix|prefix-off|prefix-pair|prefix-on-32|prefix-off-32|prefix-burst|prefix-steady|many|steady|saturation|burst|burst-base|profile|adapters" >&2; exit 2 ;;
esac
exit "${FAILED:-0}"
