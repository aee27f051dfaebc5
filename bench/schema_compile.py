"""How long xgrammar takes to compile the JSON schemas a request can send, against their size: the grounds for the
server's bound on a schema to enforce (server/api/generation.py MAX_SCHEMA_CHARS). A compile runs on a worker
thread and cannot be stopped once begun, even after its client has gone.

Shapes: tool_choice "required" over k tools of p optional string fields (the union the server builds), one tool of
many fields (a named function), and a response_format union of objects. One compile each (no cache), on this
machine's CPU, with the default model's tokenizer.

    python bench/schema_compile.py [--large]   # --large adds a 1.2 MB union (minutes)
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import xgrammar as xgr

from hotlora.server.api import tools
from hotlora.server.api.generation import MAX_SCHEMA_CHARS


def _object(fields: int, described: bool = False) -> dict[str, Any]:
    field = {"type": "string", **({"description": "x" * 20} if described else {})}
    return {"type": "object", "properties": {f"p{i}": field for i in range(fields)}}


def _required(k: int, p: int, described: bool = False) -> str:
    group = [tools.Tool.model_validate({"type": "function", "function": {"name": f"f{i}",
                                                                         "parameters": _object(p, described)}})
             for i in range(k)]
    return tools.constraint(group, "required", None).value


def shapes(large: bool) -> list[tuple[str, str]]:
    compact = {"separators": (",", ":")}
    out = [(f"required, {k} tools x {p} fields", _required(k, p)) for k, p in ((1, 40), (8, 40), (32, 40), (128, 10),
                                                                              (128, 40))]
    out += [("named, 1 tool x 400 fields", json.dumps(_object(400), **compact)),
            ("response_format anyOf 64 x 40 fields", json.dumps({"anyOf": [_object(40)] * 64}, **compact))]
    if large:
        out.append(("required, 128 tools x 150 described fields", _required(128, 150, described=True)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", action="store_true")
    args = parser.parse_args()
    from hotlora.server.model.tokenizer import load_tokenizer
    from hotlora.server.model.weights import DEFAULT_MODEL, resolve_checkpoint

    tok = load_tokenizer(resolve_checkpoint(DEFAULT_MODEL, None, progress=False).path)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)), max_threads=1,
                                   cache_enabled=False)
    print(f"{'schema':46s} {'KiB':>8s} {'compile s':>10s}  (the server refuses above {MAX_SCHEMA_CHARS >> 10} KiB)")
    for label, schema in shapes(args.large):
        start = time.perf_counter()
        compiler.compile_json_schema(schema, any_whitespace=False)
        print(f"{label:46s} {len(schema) / 1024:8.1f} {time.perf_counter() - start:10.2f}", flush=True)


if __name__ == "__main__":
    main()
