"""Write N distinct LoRA adapters in peft's on-disk format for a model's shape, fast (no peft, no model).

Each folder holds what `PeftModel.save_pretrained` writes for a LoRA on a Llama-family model:
adapter_config.json (peft's field names; task_type CAUSAL_LM) and adapter_model.safetensors with keys
`base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`, A [r, in], B [out, r].
Only the shapes of the base are needed (from a `random:<preset>` spec, a local HF folder or "default"),
so 1,000 adapters for the Llama-3-8B shape take about a minute and ~11 GB (r=8 on q/v/o, bf16).

    python bench/make_adapters.py --out /tmp/adapters --count 1000 --rank 8 --targets q,v,o \
        --model random:llama-3-8b
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hotlora.adapters.peft_config import TARGET_MODULES
from hotlora.adapters.peft_format import lora_weight_key, write_peft_folder

_SHORT = {m.removesuffix("_proj"): m for m in TARGET_MODULES}  # "q" -> "q_proj"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_targets(text: str) -> list[str]:
    """'q,v,o' or 'all' -> peft module names; full names ('q_proj') are accepted too."""
    if text == "all":
        return list(TARGET_MODULES)
    out = []
    for t in (p.strip() for p in text.split(",")):
        name = _SHORT.get(t, t)
        if name not in TARGET_MODULES:
            raise ValueError(f"unknown target {t!r}; choose from {', '.join(_SHORT)} (or 'all')")
        out.append(name)
    return out


def model_shapes(model: str) -> tuple[dict[str, tuple[int, int]], int]:
    """(module -> (out_features, in_features), number of layers) of a model spec, without its weights."""
    from hotlora.server.model.config import ModelConfig
    from hotlora.server.model.presets import preset_config

    if model.startswith("random:"):
        cfg = preset_config(model.removeprefix("random:").partition(":")[0])
    elif model == "default":
        cfg = preset_config("smollm2-135m")
    else:
        cfg = ModelConfig.from_hf_config(json.loads((Path(model) / "config.json").read_text()), model)
    return cfg.linear_shapes(), cfg.num_layers


def peft_config(rank: int, alpha: float, targets: list[str], base: str) -> dict:
    """adapter_config.json as peft writes it for a plain LoRA (fields at their defaults where unused)."""
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
        "lora_bias": False, "lora_dropout": 0.0, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "peft_type": "LORA", "r": rank, "rank_pattern": {}, "revision": None,
        "target_modules": sorted(targets), "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }  # fmt: skip


def adapter_tensors(shapes: dict[str, tuple[int, int]], num_layers: int, rank: int, targets: list[str],
                    seed: int, dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random A (kaiming-like scale) and non-zero B, so that every adapter changes the output differently.
    device: where the random numbers are drawn (a GPU draws a thousand 8B-shape adapters in seconds)."""
    gen = torch.Generator(device).manual_seed(seed)
    out = {}
    for layer in range(num_layers):
        for m in targets:
            out_f, in_f = shapes[m]
            a = torch.randn(rank, in_f, generator=gen, device=device) / in_f**0.5
            b = torch.randn(out_f, rank, generator=gen, device=device) * 0.02
            out[lora_weight_key(layer, m, "A")] = a.to(dtype).cpu()
            out[lora_weight_key(layer, m, "B")] = b.to(dtype).cpu()
    return out


def write_adapters(out: Path, count: int, rank: int, targets: list[str], model: str = "default",
                   alpha: float | None = None, dtype: str = "bfloat16", prefix: str = "lora-",
                   seed: int = 0) -> list[str]:
    """Write `count` adapters named prefix0000.. into `out`; their names."""
    shapes, num_layers = model_shapes(model)
    config = peft_config(rank, float(alpha if alpha is not None else 2 * rank), targets, model)
    names = [f"{prefix}{i:04d}" for i in range(count)]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def one(i: int) -> None:
        tensors = adapter_tensors(shapes, num_layers, rank, targets, seed * 1_000_003 + i, _DTYPES[dtype], device)
        write_peft_folder(out / names[i], tensors, config)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(count)))
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to write the adapter folders into")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 x rank)")
    p.add_argument("--targets", default="q,v,o", help="q,k,v,o,gate,up,down or 'all'")
    p.add_argument("--model", default="default", help="random:<preset>, a local HF folder, or 'default'")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    p.add_argument("--prefix", default="lora-")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    names = write_adapters(a.out, a.count, a.rank, parse_targets(a.targets), a.model, a.alpha, a.dtype,
                           a.prefix, a.seed)
    size = sum(f.stat().st_size for n in names for f in (a.out / n).iterdir())
    print(json.dumps({"out": str(a.out), "adapters": len(names), "bytes": size, "first": names[0]}))


if __name__ == "__main__":
    main()
