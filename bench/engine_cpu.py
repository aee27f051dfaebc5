"""Engine throughput on CPU: N concurrent mixed-adapter requests on the default model.

Baseline, same requests, same process: transformers + peft generating the whole batch at once with
PEFT's mixed-batch `adapter_names` (left-padded prompts, greedy). With --varied each request asks for its
own number of tokens (16..--max-tokens, as real traffic does): the engine retires each request when it is
done, the static batch runs every row to the longest; only each request's own tokens are counted.

    .venv/bin/python bench/engine_cpu.py --requests 16 --adapters 4 --max-tokens 64 --quant none nf4
    .venv/bin/python bench/engine_cpu.py --requests 32 --adapters 8 --max-tokens 128 --varied

--suite runs issue 16's cases instead, each on one engine per base format (adapters r=12 on all seven
projections): one request without and with an adapter (tok/s, TTFT, TPOT), 8 base requests, 8 requests mixing
3 adapters and the base, 32 requests over 8 adapters and the base; the mixed batches also through
transformers + peft (`adapter_names`), same prompts, same run:

    .venv/bin/python bench/engine_cpu.py --suite --max-tokens 48 --repeat 3 --quant none nf4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from engine_reference import load_base
from peft import LoraConfig, PeftModel, get_peft_model

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams
from hotlora.server.model.weights import DEFAULT_MODEL, resolve_checkpoint

TOPICS = ["the ocean", "a robot", "mountains", "coffee", "a library", "rain", "the moon", "trains"]


def make_adapters(folder: Path, out: Path, n: int, rank: int | None = None) -> dict[str, Path]:
    """n PEFT adapters on all linear layers; rank None alternates r=8 and r=16."""
    base = load_base(folder, "none")
    paths = {}
    for i in range(n):
        torch.manual_seed(i)
        cfg = LoraConfig(r=rank or (8, 16)[i % 2], lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(base, cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        model.save_pretrained(str(out / f"a{i}"))
        base = model.unload()
        paths[f"a{i}"] = out / f"a{i}"
    return paths


def workload(tokenizer, n: int, adapters: list[str], max_tokens: int,
             varied: bool) -> list[tuple[list[int], str | None, int]]:
    """(prompt ids, adapter or None, tokens to generate) per request; varied: lengths spread over 16..max_tokens."""
    names: list[str | None] = [*adapters, None]
    span = max(1, max_tokens - 15)
    return [(tokenizer.encode(f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}, number {i}."),
             names[i % len(names)], 16 + (i * 37) % span if varied else max_tokens) for i in range(n)]


def run_engine(quant: str, work, paths, repeat: int) -> tuple[float, int]:
    engine = LLMEngine(EngineConfig(model=DEFAULT_MODEL, quant=quant, max_loras=len(paths), max_lora_rank=16))
    for name, path in paths.items():
        engine.registry.register(name, path)
    engine.generate([Request("warm", work[0][0], SamplingParams(max_tokens=2, temperature=0.0), work[0][1])])
    best = None
    for rep in range(repeat):  # the best of `repeat` runs, as for the baseline
        reqs = [Request(f"r{rep}-{i}", ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), a)
                for i, (ids, a, n) in enumerate(work)]
        t0 = time.perf_counter()
        outs = engine.generate(reqs)
        dt = time.perf_counter() - t0
        best = min(best or dt, dt)
    return best, sum(len(o.new_token_ids) for o in outs)


@torch.inference_mode()
def run_peft(quant: str, folder: Path, work, paths, pad_id: int, repeat: int) -> tuple[float, int]:
    """One static batch: every row runs to the longest request's length; only each request's own tokens count."""
    names = list(paths)
    model = PeftModel.from_pretrained(load_base(folder, quant), str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    model.eval()
    width = max(len(ids) for ids, _, _ in work)
    longest = max(n for _, _, n in work)
    ids = torch.tensor([[pad_id] * (width - len(i)) + i for i, _, _ in work])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _, _ in work])
    adapter_names = [a if a is not None else "__base__" for _, a, _ in work]
    kw = dict(max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=pad_id)
    model.generate(input_ids=ids[:1], attention_mask=mask[:1], adapter_names=adapter_names[:1], max_new_tokens=2,
                   do_sample=False, pad_token_id=pad_id)
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=adapter_names, **kw)
        dt = time.perf_counter() - t0
        best = min(best or dt, dt)
    assert out.shape[1] - width == longest
    return best, sum(n for _, _, n in work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quant", nargs="+", default=["none", "nf4"])
    ap.add_argument("--repeat", type=int, default=2, help="best of N timed runs, for both sides")
    ap.add_argument("--varied", action="store_true", help="each request its own length, 16..--max-tokens")
    ap.add_argument("--suite", action="store_true", help="issue 16's cases (bench/engine_cpu_suite.py)")
    args = ap.parse_args()
    if args.suite:
        from engine_cpu_suite import run_suite

        run_suite(args.quant, args.max_tokens, args.repeat)
        return
    ckpt = resolve_checkpoint(DEFAULT_MODEL)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir), local_files_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(ckpt.path, Path(tmp), args.adapters)
        work = workload(tokenizer, args.requests, list(paths), args.max_tokens, args.varied)
        rows = []
        for quant in args.quant:
            e_dt, e_tok = run_engine(quant, work, paths, args.repeat)
            p_dt, p_tok = run_peft(quant, ckpt.path, work, paths, tokenizer.pad_token_id or 0, args.repeat)
            rows.append((quant, e_tok / e_dt, p_tok / p_dt, e_dt, p_dt))
    print(f"\nCPU: {os.cpu_count()} cores, torch {torch.__version__}, {args.requests} requests, "
          f"{args.adapters} adapters + base, "
          f"{'16..' if args.varied else ''}{args.max_tokens} new tokens each, greedy, best of {args.repeat}\n")
    print("| base | hotlora tok/s | transformers+peft (adapter_names) tok/s | speed-up | hotlora s | peft s |")
    print("|---|---|---|---|---|---|")
    for quant, e, p, e_dt, p_dt in rows:
        print(f"| {quant} | {e:.1f} | {p:.1f} | {e / p:.2f}x | {e_dt:.1f} | {p_dt:.1f} |")


if __name__ == "__main__":
    main()
