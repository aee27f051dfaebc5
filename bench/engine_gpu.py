"""Engine decode throughput on the GPU: Llama-3-8B shape (random weights), NF4 base, many LoRA adapters.

hotlora runs twice: every step replayed from CUDA graphs (the default) and eager (--cuda-graphs false).
Baseline in the same run: transformers + peft + bitsandbytes (NF4, double quant, bf16 compute) on the
same architecture, generating the same batch with PEFT's mixed-batch `adapter_names`.

    python bench/engine_gpu.py --batch 32 --adapters 32 --prompt 128 --new 64 --hf-new 16

--compare-rank-classes also runs hotlora (CUDA graphs) with --no-lora-rank-classes, in the same process: LoRA
tiles sized by max_lora_rank (64) for every step, as before issue 11 item 4, against tiles sized by each decode
step's largest adapter rank (16 for r=16); both columns are printed.

--mixes adds the issue-15 row: the same batch where half of the requests use 2-adapter mixes
("a{2i}*0.5+a{2i+1}*0.5", one slot of rank 2r each) and the other half single adapters, against the
batch of distinct single adapters; it prints the ratio (target: at least 85%).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams
from hotlora.server.model import quant
from hotlora.server.model.presets import preset_hf_config

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu only to smoke-test the script with --preset tiny
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress with elapsed seconds, so that a run cut off by its time limit still shows where it was."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def hf_nf4_model(preset: str):
    """transformers' Llama with random init, every decoder linear swapped for a bitsandbytes NF4 Linear4bit."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in preset_hf_config(preset).items() if k not in ("architectures",)})
    torch.set_default_dtype(torch.bfloat16)  # never materialise the 8B model in fp32
    try:
        with torch.device(DEV):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device=DEV)
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64).to(DEV)
                setattr(parent, name, q)
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return model


def add_adapters(model, n: int, rank: int):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=MODULES, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg, adapter_name="a0")
    for i in range(1, n):
        peft_model.add_adapter(f"a{i}", cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    return peft_model.eval()


@torch.inference_mode()
def hf_decode_rate(model, prompts: torch.Tensor, new: int, adapter_names: list[str] | None) -> float:
    """Decode tokens/s: (generate `new` tokens) - (generate 1 token), over (new - 1) tokens per row."""
    kw = dict(do_sample=False, pad_token_id=0)
    if adapter_names is not None:
        kw["adapter_names"] = adapter_names

    def timed(n: int) -> float:
        _sync()
        t = time.perf_counter()
        model.generate(input_ids=prompts, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync()
        return time.perf_counter() - t

    timed(2)
    return prompts.shape[0] * (new - 1) / (timed(new) - timed(1))


def run_hf(args, prompts: torch.Tensor) -> dict[str, float]:
    model = hf_nf4_model(args.preset)
    log("baseline: NF4 model built")
    rows = {"base": hf_decode_rate(model, prompts, args.hf_new, None)}
    log(f"baseline: base {rows['base']:.1f} tok/s")
    peft_model = add_adapters(model, args.adapters, args.rank)
    log("baseline: adapters added")
    peft_model.set_adapter("a0")
    rows["1 adapter"] = hf_decode_rate(peft_model, prompts, args.hf_new, None)
    log(f"baseline: 1 adapter {rows['1 adapter']:.1f} tok/s")
    names = [f"a{i % args.adapters}" for i in range(args.batch)]
    rows[f"{args.adapters} distinct"] = hf_decode_rate(peft_model, prompts, args.hf_new, names)
    log(f"baseline: {args.adapters} distinct {rows[f'{args.adapters} distinct']:.1f} tok/s")
    del model, peft_model
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return rows


def add_batch(engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None], new: int) -> None:
    """One greedy request per prompt (on its adapter) that decodes exactly `new` tokens."""
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    for i, (ids, a) in enumerate(zip(prompts, adapters, strict=True)):
        engine.add_request(Request(f"b{time.monotonic_ns()}-{i}", ids, params, a))


def engine_decode_rate(engine: LLMEngine, prompts: list[list[int]], new: int, adapters: list[str | None]) -> float:
    """Decode tokens/s once every request has its first token, until all finish."""
    add_batch(engine, prompts, adapters, new)
    started: set[str] = set()
    t_first = None
    decoded = 0
    while engine.has_unfinished():
        outs = engine.step()
        for o in outs:
            if o.request_id in started:
                decoded += len(o.new_token_ids)
            started.add(o.request_id)
        if t_first is None and len(started) == len(prompts):
            _sync()
            t_first = time.perf_counter()
    _sync()
    return decoded / (time.perf_counter() - t_first)


def log_graph_times(graphs, keys, mode: str) -> None:
    """Device time of one replay of each used step graph, back to back (its static inputs as the last step left
    them): what a step costs when the host never makes the GPU wait. Against a case's step time (1 / its steps
    per second) the difference is host time on the critical path."""
    from triton.testing import do_bench

    for key in keys:
        ms = do_bench(graphs.buckets[key].graph.replay, warmup=10, rep=100, return_mode="median")
        log(f"engine ({mode}): graph {key} replay {ms:.3f} ms")


def profile_decode(engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None], out: Path,
                   steps: int = 8) -> None:
    """Where a decode step's time goes: torch.profiler's top operators by device and by host time over `steps`
    decode steps of the whole batch (the prefill and the first decode step run before the profiled window, so
    a kernel's total divided by `steps` is its time a step), printed and written to `out`."""
    from torch.profiler import ProfilerActivity, profile

    engine_decode_rate(engine, prompts, 4, adapters)  # warm-up: compiles, captures
    add_batch(engine, prompts, adapters, steps + 4)  # none ends in the window
    started: set[str] = set()
    while len(started) < len(prompts):  # the prefill steps
        started.update(o.request_id for o in engine.step())
    engine.step()  # the first decode step (with asynchronous scheduling, the step after it is already prepared)
    _sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        _sync()
    while engine.has_unfinished():
        engine.step()
    keys = ("self_cuda_time_total", "self_cpu_time_total") if DEV == "cuda" else ("self_cpu_time_total",)
    head = f"{steps} decode steps of batch {len(prompts)}: a kernel's time a step is its total / {steps}"
    tables = [prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60) for key in keys]
    print(head, *tables, sep="\n", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([head, *tables]) + "\n")


def write_adapter(folder: Path, preset: str, rank: int) -> Path:
    """One PEFT-format LoRA folder (r=`rank` on all 7 projections, random A and B) for the preset's shapes.

    Every engine adapter name points at it: each name still gets its own device slot and rows, so the
    kernels move exactly the bytes of that many distinct adapters.
    """
    from hotlora.adapters.peft_format import lora_weight_key, write_peft_folder
    from hotlora.server.model.presets import preset_config

    cfg = preset_config(preset)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module, (out_f, in_f) in cfg.linear_shapes().items():
            a, b = torch.randn(rank, in_f, generator=g) * in_f**-0.5, torch.randn(out_f, rank, generator=g) * 0.01
            tensors[lora_weight_key(layer, module, "A")] = a.bfloat16()
            tensors[lora_weight_key(layer, module, "B")] = b.bfloat16()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": MODULES, "bias": "none",
              "task_type": "CAUSAL_LM", "base_model_name_or_path": f"random:{preset}"}
    return write_peft_folder(folder, tensors, config)


MIX_CASE = "half on 2-adapter mixes"


def mixed_batch(batch: int, adapters: int) -> list[str]:
    """Requests 0..batch/2-1 on distinct 2-adapter mixes, the rest on distinct single adapters."""
    half = batch // 2
    mixes = [f"a{(2 * i) % adapters}*0.5+a{(2 * i + 1) % adapters}*0.5" for i in range(half)]
    return mixes + [f"a{(half + i) % adapters}" for i in range(batch - half)]


def run_engine(args, prompts: list[list[int]], adapter_dir: Path, cuda_graphs: bool, **config) -> dict[str, float]:
    """Decode rates of every case on one engine; config: other EngineConfig fields (a variant)."""
    slots = args.adapters + (args.batch // 2 if args.mixes else 0)  # each mix takes a slot of its own
    engine = LLMEngine(EngineConfig(model=f"random:{args.preset}", quant="nf4", max_loras=slots,
                                    max_lora_rank=args.max_lora_rank or max(2 * args.rank, 64),
                                    max_num_seqs=max(args.batch, 64), max_num_batched_tokens=4096,
                                    kv_cache_memory=0.3, cuda_graphs=cuda_graphs, **config))
    mode = ("graphs" if cuda_graphs else "eager") + "".join(f", {k}={v}" for k, v in config.items())
    if engine.runner.graphs is not None:
        graphs = engine.runner.graphs
        log(f"engine ({mode}): {len(graphs.buckets)} CUDA graphs captured at startup in {graphs.capture_seconds:.1f} s")
    log(f"engine ({mode}): loaded")
    for i in range(args.adapters):
        engine.registry.register(f"a{i}", adapter_dir)
    cases = {
        "base": [None] * args.batch,
        "1 adapter": ["a0"] * args.batch,
        f"{args.adapters} distinct": [f"a{i % args.adapters}" for i in range(args.batch)],
    }
    if args.mixes:
        cases[MIX_CASE] = mixed_batch(args.batch, args.adapters)
    batches = {name: prompts for name in cases}
    if args.batch1:
        cases["batch 1, 1 adapter"], batches["batch 1, 1 adapter"] = ["a0"], prompts[:1]
        cases["batch 1, base"], batches["batch 1, base"] = [None], prompts[:1]
    for k in args.small_batches:  # where single-token-only paths (kernels.lora.FINISH_MAX_TOKENS) stop paying
        cases[f"batch {k}, 1 adapter"], batches[f"batch {k}, 1 adapter"] = ["a0"] * k, prompts[:k]
    if args.long_prompt:
        name = f"{args.adapters} distinct, prompt {args.long_prompt}"
        g = torch.Generator().manual_seed(1)
        cases[name] = cases[f"{args.adapters} distinct"]
        batches[name] = torch.randint(3, 49152, (args.batch, args.long_prompt), generator=g).tolist()
    rows = {}
    for name, adapters in cases.items():
        engine_decode_rate(engine, batches[name], 4, adapters)  # warm-up: Triton compiles, adapters load
        rows[name] = engine_decode_rate(engine, batches[name], args.new, adapters)
        log(f"engine ({mode}): {name} {rows[name]:.0f} tok/s")
    graphs = engine.runner.graphs
    if graphs is not None:
        used = sorted(key for key, n in graphs.replays.items() if n)
        log(f"engine ({mode}): graphs replayed (tokens, decode only, LoRA rank class) {used}, "
            f"capture failure: {graphs.failed}")
    log(f"engine ({mode}): {engine.stats().num_graph_steps} steps from graphs, {engine.eager_steps} eager")
    if args.graph_times and graphs is not None:
        log_graph_times(graphs, used, mode)
    if args.profile:
        name = "batch 1, 1 adapter" if args.profile == "batch1" else f"{args.adapters} distinct"
        profile_decode(engine, batches[name], cases[name], Path(args.out, f"profile_{args.profile}.txt"))
    engine.registry.close()
    del engine
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()  # the baseline needs the memory next
    return rows


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64, help="tokens per request for hotlora")
    ap.add_argument("--max-lora-rank", type=int, default=None,
                    help="the engine's max_lora_rank (default max(2 x rank, 64)); the LoRA tiles of the "
                         "--compare-rank-classes run are sized by it")
    ap.add_argument("--hf-new", type=int, default=16, help="tokens per request for the (slow) baseline")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", nargs="?", const="distinct", choices=("distinct", "batch1"), default=None,
                    help="also profile 8 decode steps (no prefill) of the distinct case, or batch 1 (implies --batch1)")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=DEV == "cuda",
                    help="also run hotlora eagerly (no CUDA graphs)")
    ap.add_argument("--batch1", action="store_true", help="also decode one request on one adapter, and one on the base")
    ap.add_argument("--graph-times", action="store_true",
                    help="also time one replay of each used step graph (device time of a step, no host)")
    ap.add_argument("--small-batches", type=int, nargs="*", default=[], help="also decode k requests on one adapter")
    ap.add_argument("--long-prompt", type=int, default=0, help="also the distinct case with prompts this long")
    ap.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                    help="run the transformers + peft + bitsandbytes baseline")
    ap.add_argument("--compare-async", action="store_true",
                    help="also run hotlora (graphs) without asynchronous scheduling (--no-async-scheduling)")
    ap.add_argument("--compare-lora-overlap", action="store_true",
                    help="also run hotlora (graphs) with each LoRA shrink after its base matmul "
                         "(HOTLORA_LORA_OVERLAP=0)")
    ap.add_argument("--compare-bnb", action="store_true", help="also run hotlora on bnb.matmul_4bit (before)")
    ap.add_argument("--mixes", action="store_true", help="also the batch with half of it on 2-adapter mixes")
    ap.add_argument("--compare-rank-classes", action="store_true",
                    help="also run hotlora (graphs) with LoRA tiles sized by max_lora_rank (--no-lora-rank-classes)")
    ap.add_argument("--compare-fp8-kv", action="store_true", help="also run hotlora (graphs) with --kv-cache-dtype fp8")
    args = ap.parse_args()
    args.batch1 |= args.profile == "batch1"
    return args


def run_variants(args: argparse.Namespace, prompts: list[list[int]], adapter: Path) -> dict[str, dict]:
    """hotlora's decode tokens/s per case, one column per variant the flags ask for (graphs first)."""
    graphs = DEV == "cuda"
    columns = {"hotlora (CUDA graphs)": run_engine(args, prompts, adapter, cuda_graphs=graphs)}
    if args.eager:
        columns["hotlora eager"] = run_engine(args, prompts, adapter, cuda_graphs=False)
    if args.compare_async:  # each step built after the previous one completed, as before
        columns["no async scheduling"] = run_engine(args, prompts, adapter, graphs, async_scheduling=False)
    if args.compare_rank_classes:  # every LoRA tile max_lora_rank rows tall, as before rank classes
        columns["LoRA tiles by max_lora_rank"] = run_engine(args, prompts, adapter, graphs, lora_rank_classes=False)
    if args.compare_fp8_kv:  # K and V stored as float8_e4m3fn: half the bytes that attention reads
        columns["fp8 KV cache"] = run_engine(args, prompts, adapter, graphs, kv_cache_dtype="fp8")
    if args.compare_lora_overlap:  # each LoRA shrink after its base matmul, as before lora_project
        os.environ["HOTLORA_LORA_OVERLAP"] = "0"
        columns["shrink not overlapped"] = run_engine(args, prompts, adapter, graphs)
        del os.environ["HOTLORA_LORA_OVERLAP"]
    if args.compare_bnb:  # the base through bnb.matmul_4bit, as before the fused NF4 kernel
        os.environ["HOTLORA_NF4_TRITON"] = "0"
        quant._FUSED_ON_CUDA = False
        columns["bnb.matmul_4bit base"] = run_engine(args, prompts, adapter, graphs)
        quant._FUSED_ON_CUDA = True
    return columns


def main() -> None:
    args = parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 49152, (args.batch, args.prompt), generator=g)
    with tempfile.TemporaryDirectory() as tmp:  # hotlora first: its numbers survive a baseline that runs long
        adapter = write_adapter(Path(tmp) / "lora", args.preset, args.rank)
        columns = run_variants(args, prompts.tolist(), adapter)
        ours = columns["hotlora (CUDA graphs)"]
    log("engine done")
    hf = run_hf(args, prompts.to(DEV)) if args.hf else {}
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "CPU"
    print(f"\n{gpu}, torch {torch.__version__}, random:{args.preset} NF4, batch {args.batch}, prompt {args.prompt}, "
          f"r={args.rank} on all 7 projections; decode tokens/s (hotlora variants in the same run)\n")
    print("| adapters in the batch | " + " | ".join(columns) + " | transformers+peft+bnb | speed-up |")
    print("|---|" + "---|" * (len(columns) + 2))
    for case in ours:
        base = hf.get(case, float("nan"))
        cells = " | ".join(f"{col.get(case, 0):.0f}" for col in columns.values())
        print(f"| {case} | {cells} | {base:.1f} | {ours[case] / base:.1f}x |")
    if MIX_CASE in ours:
        distinct = ours[f"{args.adapters} distinct"]
        print(f"\n{MIX_CASE} / {args.adapters} distinct single adapters: {ours[MIX_CASE] / distinct:.1%} "
              "(issue 15 asks for at least 85%)")
    print("\n(random weights: speed only; both sides use the same architecture, batch and adapter count)")
    record = {"gpu": gpu, "hotlora": ours, "variants": columns, "hf": hf, **vars(args)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "engine_gpu.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
