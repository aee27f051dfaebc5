"""`hotlora merge`: an adapter (or a weighted mix) merged into the base model's weights, written as a Hugging Face
folder (server/model/merge.py does the work)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add_merge(sub: Any) -> None:
    p = sub.add_parser(
        "merge",
        help="merge an adapter (or a weighted mix) into the base model and write a Hugging Face folder",
        description="Write W + scale * B @ A (a mix: the sum over its adapters, as PEFT's add_weighted_adapter "
        "with combination_type='cat') into the base's unquantized weights, as a folder that transformers "
        "loads and `hotlora serve --model DIR` serves. Written to a temporary folder, then renamed.",
    )
    p.add_argument("--model", default=os.environ.get("HOTLORA_MODEL", "default"),
                   help="base model: 'default', a local Hugging Face folder or a .gguf file [env HOTLORA_MODEL]")
    p.add_argument("--adapter", required=True, metavar="NAME_OR_FOLDER_OR_MIX",
                   help="a PEFT adapter folder, an adapter name in --adapter-dir, or a mix of names such as "
                   "'sql*0.7+chat*0.3'")
    p.add_argument("--out", required=True, type=Path, help="the folder to write")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="weight dtype of the output (default: the base's)")
    p.add_argument("--force", action="store_true", help="replace --out if it is not empty")
    p.add_argument("--cache-dir", type=Path, default=None, help="converted-model cache (as for serve)")
    p.add_argument("--adapter-dir", type=Path, default=os.environ.get("HOTLORA_ADAPTER_DIR") or None,
                   help="the adapter store adapter names are looked up in (default <cache-dir>/adapters) "
                   "[env HOTLORA_ADAPTER_DIR]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=merge_command)


def merge_command(args: argparse.Namespace) -> int:
    from hotlora.adapters.peft_format import AdapterError
    from hotlora.server.model.merge import MergeError, merge

    try:
        out = merge(args.model, args.adapter, args.out, args.dtype, args.force, args.cache_dir, args.adapter_dir,
                    progress=not args.no_progress)
    except (AdapterError, MergeError, FileNotFoundError, ValueError) as exc:
        print(f"hotlora merge: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0
