"""Where a saturated serving step's device time goes (issue 11): the all-at-once workload of
`bench/serve_h200.sh burst` (240 requests, prompts U[64,1024], outputs U[32,256], the base model, then Zipf(1.1)
over 128 r=16 adapters) through the engine's Python API, no HTTP, on the serving defaults.

Per workload it prints the engine's output tok/s over the whole run (the HTTP runs' figure, without the server),
then runs the workload again under torch.profiler from step --skip for --steps steps (prefill chunks and decodes
mixed, as under saturation) and prints the device time a step by kernel family, and the top kernels.

    HOTLORA_NO_PDL=1 python bench/step_profile.py    # per-kernel times need plain launches: under programmatic
                                                     # dependent launch a kernel's wait counts as its own time
    python bench/step_profile.py --preset tiny       # CPU smoke test (the profile then holds CPU operators)
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from engine_gpu import DEV, write_adapter
from serve import plan

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams

# kernel families, first match wins (device kernel names of this build: Triton kernels keep their function names)
FAMILIES = (
    ("NF4 matmul", r"nf4_matmul|nf4_gemv|nf4_regs|nf4_ss"),
    ("NF4 dequantize (dense path)", r"dequant|nf4_to"),
    ("LoRA shrink (beside the matmul)", r"lora_shrink"),
    ("LoRA expand / finish", r"lora_expand|lora_finish|lora_tile_finish"),
    ("norm (+ shrink)", r"norm"),
    ("SiLU*mul (+ shrink)", r"silu"),
    ("attention", r"attn|attention"),
    ("rope + KV write", r"rope|kv_write|cache"),
    ("split-K reduce", r"reduce"),
    ("cuBLAS GEMM", r"gemm|nvjet|sm90_|cutlass|xmma"),
    ("copies", r"[Mm]emcpy|[Mm]emset|copy"),
    ("sampling", r"sampl|softmax|topk|argmax|gumbel|sort"),
)


def family(name: str) -> str:
    return next((fam for fam, pat in FAMILIES if re.search(pat, name)), "other")


def requests(n: int, models: list[str], zipf: float | None, seed: int) -> list[Request]:
    out = []
    for i, p in enumerate(plan(n, 0.0, (64, 1024), (32, 256), models, zipf, seed)):
        params = SamplingParams(max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True)
        out.append(Request(f"r{time.monotonic_ns()}-{i}", p.prompt, params, None if p.model == "base" else p.model))
    return out


def run(engine: LLMEngine, reqs: list[Request], prof_window: tuple[int, int] | None = None):
    """Step until every request finishes: (output tokens / s, steps, the profiler or None)."""
    for r in reqs:
        engine.add_request(r)
    prof, steps, tokens = None, 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        if prof_window and steps == prof_window[0]:
            from torch.profiler import profile

            prof = profile(activities=activities())
            prof.start()
        tokens += sum(len(o.new_token_ids) for o in engine.step())
        steps += 1
        if prof is not None and steps == prof_window[0] + prof_window[1]:
            if DEV == "cuda":
                torch.cuda.synchronize()
            prof.stop()
    if DEV == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0), steps, prof


def activities() -> list:
    """What the profiler records: CPU operators, and on CUDA the device kernels."""
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])


def kernel_times(prof) -> list[tuple[float, int, str]]:
    """(self time in us, launches, name) of every device kernel the profile holds (CPU operators on the CPU)."""
    use_cuda = DEV == "cuda"
    rows = []
    for ev in prof.key_averages():
        t = ev.self_device_time_total if use_cuda else ev.self_cpu_time_total
        if t > 0 and not (use_cuda and ev.device_type != torch.autograd.DeviceType.CUDA):
            rows.append((t, ev.count, ev.key))
    return rows


def by_family(rows: list[tuple[float, int, str]]) -> dict[str, float]:
    """kernel_times' rows summed by kernel family (us)."""
    per: dict[str, float] = defaultdict(float)
    for t, _, key in rows:
        per[family(key)] += t
    return per


def report(name: str, prof, steps: int) -> None:
    rows = kernel_times(prof)
    per = by_family(rows)
    total = sum(per.values())
    print(f"\n{name}: device time a step by kernel family, over {steps} profiled steps "
          f"({total / steps / 1e3:.2f} ms a step in all)")
    for fam, t in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:30s} {t / steps / 1e3:7.3f} ms  {t / total:6.1%}")
    print("  top kernels (ms a step, launches a step):")
    for t, n, key in sorted(rows, reverse=True)[:15]:
        print(f"    {t / steps / 1e3:7.3f}  {n / steps:6.1f}  {key[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--adapters", type=int, default=128)
    ap.add_argument("--skip", type=int, default=40, help="steps before the profiled window")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps")
    ap.add_argument("--max-lora-rank", type=int, default=16, help="16: only the r=16 class's graphs are captured")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8 (EngineConfig.kv_cache_dtype)")
    args = ap.parse_args()
    cfg = EngineConfig(model=f"random:{args.preset}", quant="nf4", max_loras=64, max_lora_rank=args.max_lora_rank,
                       kv_cache_dtype=args.kv_cache_dtype)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    print(f"engine ready in {time.perf_counter() - t0:.0f} s: {cfg.max_num_seqs} sequences, "
          f"{cfg.max_num_batched_tokens} tokens a step", flush=True)
    names = [f"a{i}" for i in range(args.adapters)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_adapter(Path(tmp) / "lora", args.preset, 16)
        for n in names:
            engine.registry.register(n, folder)
        cases = (("base", ["base"], None), (f"Zipf(1.1) over {args.adapters}", names, 1.1))
        for seed, (label, models, zipf) in enumerate(cases):  # other prompts in each run: no prefix-cache hit
            run(engine, requests(min(64, args.requests), models[:64], None, 10 + seed))  # warm-up: compiles, hot loads
            rate, steps, _ = run(engine, requests(args.requests, models, zipf, 20 + seed))
            print(f"{label}: {rate:.0f} output tok/s, {steps} steps", flush=True)
            _, _, prof = run(engine, requests(args.requests, models, zipf, 30 + seed), (args.skip, args.steps))
            report(label, prof, args.steps)
    engine.registry.close()


if __name__ == "__main__":
    main()
