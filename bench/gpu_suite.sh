#!/usr/bin/env bash
# The GPU tests (pytest -m gpu) in parts that each fit one device call (at most 10 minutes), with their durations:
#   bash bench/gpu_suite.sh 1|2|3|4      # or: all (the parts one after another)
# Files with GPU tests: those that mark them, and those using the kernel_device fixture (tests/conftest.py).
# The whole suite took ~11 minutes on the H200 in the twenty-third session; one call cut at 540 s lost the end.
# Each part stops itself after GPU_SUITE_LIMIT seconds (default 540) by SIGINT, on which pytest still prints its
# summary (counts, failures): a device call's own limit kills it silently, so what had passed is lost.
set -euo pipefail
cd "$(dirname "$0")/.."
parts=(
  ""
  "tests/test_adapter_cuda.py tests/test_adapter_mixes_gpu.py tests/test_attention_kernel.py"
  "tests/test_engine_gpu.py tests/test_logits_processors.py tests/test_logits_masks.py tests/test_pdl_gpu.py
   tests/test_prefix_cache_gpu.py"
  "tests/test_prompt_logprobs.py tests/test_quant.py tests/test_sampler_device.py tests/test_nf4_kernel_gpu.py
   tests/test_elementwise_kernels.py tests/test_lora_fused.py"
  "tests/test_lora_kernels_gpu.py"
)
which=${1:-all}
[[ $which == all ]] && which="1 2 3 4"
for p in $which; do
  echo "== part $p: ${parts[$p]}"
  # shellcheck disable=SC2086
  timeout -s INT "${GPU_SUITE_LIMIT:-540}" python3 -m pytest -q -p no:cacheprovider -m gpu -rfE --durations=10 \
    ${parts[$p]}
done
