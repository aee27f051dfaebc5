"""The reference the engine is held to: transformers + peft, one request at a time, greedy."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

# Four adapters that differ in rank, alpha, rslora and target modules: one batch must honour each.
ADAPTER_SPECS: dict[str, dict] = {
    "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    "mlp4rs": dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["o_proj", "gate_proj", "down_proj"]),
    "ku12": dict(r=12, lora_alpha=24, target_modules=["k_proj", "up_proj"]),
}

# Mixes of those adapters (adapters/mixspec.py): two and three components of different ranks and target
# sets, a negative weight, overlapping targets (all16 and qv8 both target q/v). PEFT copies the first
# adapter's config into the mix (an rslora first component would give the mix an rslora scale), so no
# mix starts with the rslora adapter mlp4rs.
MIX2 = "qv8*0.7+ku12*0.5"
MIX2_NEG = "all16*0.6+qv8*-0.8"
MIX3 = "ku12*0.5+mlp4rs*1.2+qv8*-0.4"


def load_base(folder: Path, quant: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    kw: dict = {"dtype": dtype, "device_map": device}
    if quant == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kw).eval()


def save_adapters(folder: Path, out: Path, b_std: float = 0.1) -> dict[str, Path]:
    """Save each ADAPTER_SPECS adapter with peft: random A (peft's init) and random non-zero B."""
    base = load_base(folder, "none")
    paths = {}
    for i, (name, spec) in enumerate(ADAPTER_SPECS.items()):
        torch.manual_seed(100 + i)
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, **spec))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0.0, b_std)
        model.save_pretrained(str(out / name))
        base = model.unload()
        paths[name] = out / name
    return paths


class Reference:
    """A base model with every adapter loaded into one PeftModel; generates one request at a time."""

    def __init__(self, folder: Path, adapters: dict[str, Path], quant: str, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.device = device
        base = load_base(folder, quant, device, dtype)
        names = list(adapters)
        self.model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model.eval()
        self.mixes: dict[str, str] = {}  # mix text -> its PEFT adapter name

    @torch.inference_mode()
    def greedy(self, prompt: list[int], adapter: str | None, n: int) -> list[int]:
        if adapter is None:
            with self.model.disable_adapter():
                return self._loop(prompt, n)
        self.model.set_adapter(self.mixes.get(adapter, adapter))
        return self._loop(prompt, n)

    @torch.inference_mode()
    def greedy_batch(self, prompt: list[int], adapters: list[str | None], n: int) -> list[list[int]]:
        """greedy() of one prompt under several adapters (None: the base) in one batch, through PEFT's
        mixed-adapter batches (adapter_names): one pass per token for all of them."""
        names = ["__base__" if a is None else self.mixes.get(a, a) for a in adapters]
        ids = torch.tensor([prompt] * len(names), device=self.device)
        out = self.model(input_ids=ids, use_cache=True, adapter_names=names)
        tokens: list[list[int]] = [[] for _ in names]
        for _ in range(n):
            step = out.logits[:, -1].argmax(dim=-1)
            for row, tok in zip(tokens, step.tolist(), strict=True):
                row.append(tok)
            out = self.model(input_ids=step[:, None], past_key_values=out.past_key_values, use_cache=True,
                             adapter_names=names)
        return tokens

    def add_mix(self, text: str) -> str:
        """Add the adapter mix `text` ("a*0.7+b*0.3") as PEFT's add_weighted_adapter(combination_type="cat")
        under a name of its own; greedy() and score() then take `text` like any adapter name."""
        from hotlora.adapters.mixspec import parse_mix

        spec = parse_mix(text)
        name = f"mix{len(self.mixes)}"  # PEFT's adapter names are module keys: no '.', so not the text itself
        self.model.add_weighted_adapter(spec.names, [c.weight for c in spec.components], name, combination_type="cat")
        self.mixes[text] = name
        return text

    @torch.inference_mode()
    def score(self, prompt: list[int], tokens: list[int], adapter: str | None) -> torch.Tensor:
        """Teacher-forced log-probabilities [len(tokens), vocab] of the continuation `tokens`."""
        ids = torch.tensor([prompt + tokens], device=self.device)
        if adapter is None:
            with self.model.disable_adapter():
                logits = self.model(input_ids=ids).logits
        else:
            self.model.set_adapter(self.mixes.get(adapter, adapter))
            logits = self.model(input_ids=ids).logits
        return torch.log_softmax(logits[0, len(prompt) - 1 : -1].float(), dim=-1).cpu()

    def _loop(self, prompt: list[int], n: int) -> list[int]:
        return greedy_loop(self.model, prompt, n, self.device)


@torch.inference_mode()
def greedy_loop(model: torch.nn.Module, prompt: list[int], n: int, device: str = "cpu") -> list[int]:
    """n greedy tokens of a transformers (or peft) causal LM, EOS ignored."""
    ids = torch.tensor([prompt], device=device)
    out = model(input_ids=ids, use_cache=True)
    tokens: list[int] = []
    for _ in range(n):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        step = torch.tensor([[tok]], device=device)
        out = model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
    return tokens


# Prompts of different lengths for the default model's batching tests (chunked prefill, staggered arrivals).
VARIED_PROMPTS = [
    "Hello, my name is",
    "Write a haiku about the sea. The sea is",
    "1, 2, 3, 4,",
    "In the beginning",
    "A short story about a robot who learns to paint. Chapter one: the robot woke up and",
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colours:",
    "The quick brown fox",
    "Water boils at",
]


def mixed_requests(tokenizer) -> list[tuple[list[int], str | None]]:
    """Four adapters, the base, and one adapter twice: (prompt ids, adapter name or None)."""
    names: list[str | None] = [*ADAPTER_SPECS, None, "qv8"]
    return [(tokenizer.encode(p), a) for p, a in zip(PROMPTS, names, strict=True)]


def teacher_forced_gaps(ref: Reference, work, outs, n_tokens: int) -> list[tuple[float, float]]:
    """Per request: how far below the reference's best each engine token is (max over positions, nats),
    and the largest |engine logprob - reference logprob| of the chosen tokens."""
    res = []
    for (ids, adapter), out in zip(work, outs, strict=True):
        lp = ref.score(ids, out.new_token_ids, adapter)
        chosen = lp[torch.arange(n_tokens), torch.tensor(out.new_token_ids)]
        gap = (lp.max(dim=-1).values - chosen).max().item()
        engine_lp = torch.tensor([t.logprob for t in out.logprobs])
        res.append((gap, (engine_lp - chosen).abs().max().item()))
    return res


def drain_outputs(engine, arrivals: dict[int, list], aborts: dict[int, str] | None = None,
                  each_step=None) -> dict[str, list]:
    """Add each step's arrivals (step index -> Requests) and abort the request ids of `aborts` (step index ->
    id), step until everything finishes; every request's outputs in order. each_step(engine), if given, runs
    after every step. No output may carry an error."""
    arrivals, aborts = dict(arrivals), dict(aborts or {})
    outputs: dict[str, list] = {}
    step = 0
    while arrivals or engine.has_unfinished():
        for req in arrivals.pop(step, []):
            engine.add_request(req)
        if step in aborts:
            engine.abort(aborts.pop(step))
        for out in engine.step():
            assert out.error is None, out.error
            outputs.setdefault(out.request_id, []).append(out)
        if each_step is not None:
            each_step(engine)
        step += 1
        assert step < 2000
    return outputs


def drain(engine, arrivals: dict[int, list]) -> dict[str, list[int]]:
    """drain_outputs' tokens per request."""
    outputs = drain_outputs(engine, arrivals)
    return {rid: [t for out in outs for t in out.new_token_ids] for rid, outs in outputs.items()}


def run_engine_mixed(adapters: dict[str, Path], work, n_tokens: int, **config):
    """The mixed batch through LLMEngine, greedy with logprobs; checks nothing is left allocated."""
    from hotlora.server.engine.config import EngineConfig
    from hotlora.server.engine.engine import LLMEngine
    from hotlora.server.engine.types import Request, SamplingParams

    config = {"model": "default", "max_loras": 4, "max_lora_rank": 16, "kv_cache_memory": 0.25} | config
    engine = LLMEngine(EngineConfig(**config))
    for name, path in adapters.items():
        engine.registry.register(name, path)
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = engine.generate([Request(f"r{i}", ids, params, a) for i, (ids, a) in enumerate(work)])
    assert all(o.finish_reason.value == "length" for o in outs)
    assert engine.blocks.num_used == 0 and engine.stats().num_running == 0
    graphs = engine.runner.graphs  # on CUDA: the steps were replayed from captured graphs
    if graphs is not None:
        assert graphs.failed is None, graphs.failed
        assert any(b.graph is not None for b in graphs.buckets.values())
    return outs


# bf16 end to end on both sides (and NF4 dequantized to bf16): logits carry ~1e-2 relative noise, so a
# chosen token may trail the reference's best by a near-tie; 0.5 nats is far below a real disagreement.
# The random-weight model's distributions are flat and its activations large, so bf16 moves individual
# log-probabilities by up to ~0.5 nats (seen on CPU in bf16 too): BF16_LOGPROB bounds that. Its embeddings
# are scaled down (BF16_EMBED_SCALE): with std-1 embeddings and a tied lm_head the logits reach ~150, where
# one bf16 step is 1 nat, and a qv8 request failed on the H200 by a 2-nat "gap" (two bf16 steps) that the
# same batch through the Triton kernels in fp32 (interpreter) did not show (max logprob difference 5e-5).
BF16_TIE = 0.5
BF16_LOGPROB = 1.0
BF16_EMBED_SCALE = 0.05  # the GPU tests' random models: logits of magnitude ~6, where a bf16 step is ~0.03


def save_random_model(preset: str, folder: Path, embed_scale: float = 1.0) -> Path:
    """A `random:<preset>` checkpoint written as an HF folder (config.json + safetensors), no tokenizer.

    embed_scale multiplies the embedding (and lm_head) weights. Random embeddings have std 1, so a tied lm_head
    gives logits of magnitude ~150, where one bf16 step is 1.0 nat: bf16 comparisons want them smaller."""
    import json

    from safetensors.torch import save_file

    from hotlora.server.model.presets import preset_hf_config
    from hotlora.server.model.weights import resolve_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    ckpt = resolve_checkpoint(f"random:{preset}", folder / "cache", progress=False)
    (folder / "config.json").write_text(json.dumps(preset_hf_config(preset)))
    tensors = dict(ckpt.tensors("cpu", torch.float32))
    for name, t in tensors.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            t.mul_(embed_scale)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def default_engine(cache: Path, adapters: dict[str, Path], **kw):
    """An engine with `adapters` registered: by default fp32 on the default model, 4 slots, rank <= 16; kw
    sets any other EngineConfig field (or overrides those)."""
    from hotlora.server.engine.config import EngineConfig
    from hotlora.server.engine.engine import LLMEngine

    kw = {"model": "default", "quant": "none", "max_loras": 4, "max_lora_rank": 16, "kv_cache_memory": 0.05} | kw
    eng = LLMEngine(EngineConfig(cache_dir=cache, **kw))
    for name, path in adapters.items():
        eng.registry.register(name, path)
    return eng
