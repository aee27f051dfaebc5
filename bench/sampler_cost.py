"""What the sampler's processors cost per step, on the logits alone (no model): the batched penalties
(presence/frequency/repetition with their [rows, vocab] token counts), logit_bias + the min_tokens mask,
and the structured-output bitmask (fill on the host + apply on the device), at a batch and vocab size.

    python bench/sampler_cost.py --batch 32 --vocab 128256 --history 640    # the Llama-3-8B vocab
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import xgrammar as xgr

from hotlora.server.engine.types import SamplingParams
from hotlora.server.model.sampler import SampleRequest, process


def _timed(fn, device: torch.device, iters: int) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--history", type=int, default=640, help="prompt + generated tokens per row")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits = torch.randn(args.batch, args.vocab, device=dev)
    hist = torch.randint(0, args.vocab, (args.batch, args.history)).tolist()
    gen = torch.Generator()

    def reqs(params: SamplingParams) -> list[SampleRequest]:
        return [SampleRequest(params, gen, h[: args.history // 2], h[args.history // 2 :]) for h in hist]

    penalties = reqs(SamplingParams(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5))
    bias = reqs(SamplingParams(logit_bias={i: 1.0 for i in range(300)}, min_tokens=16, max_tokens=32))
    # an all-ones bitmask costs the same to apply as a real grammar's; the host fill is measured apart
    bitmask = xgr.allocate_token_bitmask(args.batch, args.vocab)
    rows = list(range(args.batch))

    def apply_bitmask() -> None:
        out = logits.clone()
        xgr.apply_token_bitmask_inplace(out, bitmask.to(dev, non_blocking=True), indices=rows)

    result = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "batch": args.batch, "vocab": args.vocab, "history": args.history,
        "penalties_ms": _timed(lambda: process(logits, penalties, {2}), dev, args.iters),
        "logit_bias_min_tokens_ms": _timed(lambda: process(logits, bias, {2}), dev, args.iters),
        "bitmask_apply_ms": _timed(apply_bitmask, dev, args.iters),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
