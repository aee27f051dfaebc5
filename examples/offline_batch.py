"""One engine, several PEFT adapters, one batch, no HTTP.

    .venv/bin/python examples/offline_batch.py /path/to/adapter_a /path/to/adapter_b ...

Each argument is a folder written by peft's save_pretrained for the default model (SmolLM2-135M-Instruct).
Every adapter and the base model answer the same prompt in the same batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hotlora.server.engine.config import EngineConfig
from hotlora.server.engine.engine import LLMEngine
from hotlora.server.engine.types import Request, SamplingParams


def main(folders: list[str]) -> None:
    engine = LLMEngine(EngineConfig(model="default", quant="nf4", max_loras=max(1, len(folders))))
    names: list[str | None] = [None]
    for folder in folders:
        names.append(Path(folder).name)
        engine.registry.register(Path(folder).name, Path(folder))
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    for name, out in zip(names, engine.generate([Request(f"r{i}", ids, params, n) for i, n in enumerate(names)]),
                         strict=True):
        print(f"--- {name or 'base model'} ({out.finish_reason.value}, {out.completion_tokens} tokens)")
        print(out.new_text.strip())


if __name__ == "__main__":
    main(sys.argv[1:])
