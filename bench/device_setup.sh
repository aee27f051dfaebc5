#!/usr/bin/env bash
# Set-up for runs on the lent GPU machine, whose image has torch, triton, transformers, peft and pytest but not the
# rest of hotlora's dependencies.
#   bash bench/device_setup.sh fetch      # here (dev machine): every wheel the GPU tests and benches need, into .whl/
#   source bench/device_setup.sh install  # there, first in each device call (carry .whl): the wheels and hotlora
#                                         # itself into /tmp/site, on PYTHONPATH; prints the GPU and its clocks
# fetch wraps ../shared/device/fetch-wheels.sh (its default set: the server, bitsandbytes, the openai client) and adds
# what its set lacks: jsonschema and PyYAML (four test modules import them), aiohttp (bench/serve.py), xgrammar and
# google-re2 (structured outputs), httptools.
case ${1:-} in
  fetch)
    cd "$(git rev-parse --show-toplevel)" || exit 1
    bash ../shared/device/fetch-wheels.sh aiohttp multidict yarl frozenlist aiosignal propcache aiohappyeyeballs idna \
      attrs xgrammar google-re2 httptools apache-tvm-ffi jsonschema referencing rpds-py jsonschema-specifications pyyaml
    ;;
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      > /tmp/pip-wheels.log 2>&1 || { tail -5 /tmp/pip-wheels.log; return 1 2>/dev/null || exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . \
      > /tmp/pip-hotlora.log 2>&1 || { tail -5 /tmp/pip-hotlora.log; return 1 2>/dev/null || exit 1; }
    export PYTHONPATH=/tmp/site
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv,noheader
    ;;
  *)
    echo "usage: bash bench/device_setup.sh fetch | source bench/device_setup.sh install" >&2
    return 2 2>/dev/null || exit 2
    ;;
esac
