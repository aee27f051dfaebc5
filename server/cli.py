"""The `hotlora` command: `serve` (the server; its flags and settings are built here), `serve-ray`
(server/cli_ray.py), `adapters ...` (a client of the admin API, server/cli_admin.py) and `merge`.

Every `serve` flag --some-flag can also be set with the environment variable HOTLORA_SOME_FLAG; a flag
given on the command line wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotlora.server.api.tool_parsers import PARSERS as TOOL_PARSERS  # the standard library only: the CLI stays light
from hotlora.server.cli_admin import adapters_command as adapters_command  # re-exported: its old home
from hotlora.server.cli_admin import add_adapters
from hotlora.server.cli_merge import add_merge
from hotlora.server.cli_ray import add_serve_ray
from hotlora.server.engine.config import (
    DTYPE_CHOICES,
    KV_CACHE_DTYPE_CHOICES,
    QUANT_CHOICES,
    SCHEDULING_POLICIES,
    EngineConfig,
)

ENV_PREFIX = "HOTLORA_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from '4096', '512M', '2GiB', '1.5g' (powers of 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 512M, 2GiB)")
    return int(float(m[1]) * 1024 ** " kmgt".index(m[2].lower() or " "))


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (true or false)")
    return value in ("1", "true", "yes", "on")


def optional_int(text: str) -> int | None:
    return None if str(text).lower() in ("", "none", "auto") else int(text)


def paths(text: str) -> tuple[Path, ...]:
    """Comma-separated folders, each made absolute (empty: none)."""
    return tuple(Path(p.strip()).expanduser().absolute() for p in text.split(",") if p.strip())


def port(text: str) -> int:
    """A TCP port, 0-65535 (uvicorn took 70000 and listened on 70000 - 65536; -1 failed only after the model loaded)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r} (0-65535)")
    return value


def switch_interval(text: str) -> float:
    """Seconds for sys.setswitchinterval: finite and at least its 1 us resolution (it takes nan as ~292,000 years,
    and inf or 1e-9 as 0)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (1e-6 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"not a switch interval: {text!r} (seconds, at least 1e-6; e.g. 0.001)")
    return value


@dataclass(frozen=True)
class Opt:
    flag: str
    type: Any
    help: str
    choices: tuple[str, ...] | None = None
    engine: bool = True  # an EngineConfig field (named like the flag)
    switch: bool = False  # a boolean given as --flag / --no-flag

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


SERVE_OPTIONS = (
    Opt(
        "model",
        str,
        "base model: 'default' (the embedded SmolLM2-135M-Instruct), a local Hugging Face folder, "
        "a .gguf file, or random:<preset> (random weights, for benchmarks)",
    ),
    Opt("quant", str, "nf4: 4-bit bitsandbytes NF4 base weights; none: keep 16/32-bit weights", QUANT_CHOICES),
    Opt("device", str, "cpu, cuda, cuda:N, or auto (cuda when present)"),
    Opt("dtype", str, "activation/weight dtype; auto is bfloat16 on cuda, float32 on cpu", DTYPE_CHOICES),
    Opt("cache-dir", Path, "where converted GGUF models are cached (default ~/.cache/hotlora; also $HOTLORA_CACHE)"),
    Opt("tokenizer", Path, "a folder holding the tokenizer to use instead of the model's (random:<preset> has none "
        "unless the default model is installed)"),
    Opt(
        "adapter-dir",
        Path,
        "the adapter store: one PEFT folder per adapter name, all registered at start, "
        "uploads land here (default <cache-dir>/adapters)",
    ),
    Opt(
        "adapter-store",
        str,
        "s3://bucket/prefix: a shared adapter store in S3-compatible object storage (credentials from the usual "
        "AWS environment variables), cached under --adapter-dir; default: the local --adapter-dir itself",
        engine=False,
    ),
    Opt("s3-endpoint-url", str, "endpoint of an S3-compatible server (MinIO, ...) for --adapter-store", engine=False),
    Opt("adapter-store-ttl-s", float,
        "seconds a replica trusts the adapter versions it last read from the shared store", engine=False),
    Opt("max-loras", int, "adapters resident on the device at once (device slots)"),
    Opt("max-lora-rank", int, "largest LoRA rank accepted"),
    Opt("lora-pool-rows", optional_int, "rows of the per-module device LoRA pools (default max-loras x max-lora-rank)"),
    Opt("lora-rank-classes", parse_bool, "size the LoRA kernels' rank tiles by each step's largest adapter "
        "rank (16/32/64, one CUDA graph per class); off: by --max-lora-rank", switch=True),
    Opt("max-cpu-lora-bytes", parse_size, "host-memory budget for loaded adapter copies (e.g. 2GiB)"),
    Opt("max-adapter-wait-steps", int,
        "engine steps a request may be passed over for requests whose adapters are on the device"),
    Opt("scheduling-policy", str, "fcfs (first come, first served) or priority: each request's `priority` (lower "
        "first) orders admission and preemption, as vLLM's", SCHEDULING_POLICIES),
    Opt("max-num-seqs", optional_int, "sequences decoded together at most (default: 256 on cuda, 64 on cpu)"),
    Opt("max-num-batched-tokens", optional_int,
        "tokens (prefill + decode) per engine step at most (default: 4096 on cuda, 2048 on cpu)"),
    Opt(
        "max-model-len",
        optional_int,
        "context length: prompt + completion tokens (default: the model's, capped at 8192)",
    ),
    Opt("block-size", int, "tokens per KV-cache block"),
    Opt("num-kv-blocks", optional_int, "KV-cache blocks (default: sized from --kv-cache-memory)"),
    Opt("kv-cache-memory", float, "KV-cache size: a fraction of free GPU memory on cuda, GiB on cpu"),
    Opt("kv-cache-dtype", str, "KV-cache element type: auto (the model's dtype) or fp8 (float8_e4m3fn, unscaled: "
        "twice the tokens of bf16, slower to attend over; outputs then differ slightly from the unquantized "
        "model's)", KV_CACHE_DTYPE_CHOICES),
    Opt("max-waiting", int, "requests allowed to wait for a slot; more are answered 429"),
    Opt("seed", int, "seed for requests that do not give one"),
    Opt("cuda-graphs", parse_bool, "replay every step from CUDA graphs on cuda: true or false"),
    Opt("async-scheduling", parse_bool, "schedule and prepare each step while the previous one runs on the GPU "
        "(cuda only)", switch=True),
    Opt("launch-pacing", parse_bool, "with asynchronous scheduling, build each step just before the GPU needs it, "
        "so that requests arriving meanwhile join it (a shorter time to first token)", switch=True),
    Opt(
        "enable-prefix-caching",
        parse_bool,
        "reuse the KV cache of prompt prefixes seen before (kept apart per adapter version)",
        switch=True,
    ),
    Opt("host", str, "address to listen on", engine=False),
    Opt("port", port, "port to listen on", engine=False),
    Opt(
        "admin-token-file",
        Path,
        "file holding the admin API bearer token (else $HOTLORA_ADMIN_TOKEN; with neither, the admin API answers 403)",
        engine=False,
    ),
    Opt("served-model-name", str, "the base model's name in the API (default: the model's own name)", engine=False),
    Opt(
        "max-upload-bytes",
        parse_size,
        "largest adapter upload, after decompression (e.g. 4GiB); never more than an adapter of "
        "--max-lora-rank can be for the base",
        engine=False,
    ),
    Opt("max-body-bytes", parse_size, "largest request body on the /v1 routes (e.g. 8MiB); more is 413", engine=False),
    Opt(
        "shutdown-grace-s",
        float,
        "on SIGTERM: seconds running requests may take to finish before they end with an error",
        engine=False,
    ),
    Opt("gil-switch-interval", switch_interval,
        "seconds a Python thread may hold the GIL while another waits (sys.setswitchinterval; Python's default: "
        "0.005): the engine thread waits at most this long for the HTTP event loop", engine=False),
    Opt("gc-freeze", parse_bool, "once the model is ready, freeze the start-up heap out of Python's garbage "
        "collector (shorter collection pauses)", engine=False, switch=True),
    Opt("tool-call-parser", str, "how tool_choice 'auto' reads the model's tool calls: hermes (<tool_call> blocks), "
        "llama3_json (a reply of JSON objects, Llama 3.1/3.2), pythonic (a Python list of calls, Llama 4), none "
        "(then 'auto' is refused), or auto (the one the chat template shows)",
        TOOL_PARSERS, engine=False),
    Opt("allowed-lora-paths", paths, "folders (comma-separated) that POST /v1/load_lora_adapter, vLLM's runtime LoRA "
        "API, may read PEFT adapters from (admin token required); none: that route answers 403", engine=False),
    Opt("log-level", str, "log level", LOG_LEVELS, engine=False),
)
_TYPES = {"int": int, "float": float, "str": str, "Path": Path, "int | None": optional_int, "bool": None}


def _engine_extras() -> tuple[Opt, ...]:
    """EngineConfig fields without a hand-written Opt above still get a flag (and an env var)."""
    known = {o.dest for o in SERVE_OPTIONS}
    extras = []
    for name, f in EngineConfig.__dataclass_fields__.items():
        kind = str(f.type).replace("None | ", "").strip()
        kind = "int | None" if kind == "int | None" else kind.split(" | ")[0]
        if name not in known and _TYPES.get(kind):
            extras.append(Opt(name.replace("_", "-"), _TYPES[kind], f"engine setting {name}"))
    return tuple(extras)


_SERVE_DEFAULTS = {
    "host": "127.0.0.1",
    "port": 8000,
    "admin_token_file": None,
    "served_model_name": None,
    "max_upload_bytes": 4 << 30,
    "max_body_bytes": 8 << 20,
    "shutdown_grace_s": 30.0,
    "log_level": "info",
    "allowed_lora_paths": (),
    "gil_switch_interval": sys.getswitchinterval(),
    "gc_freeze": True,
    "adapter_store": None,
    "s3_endpoint_url": None,
    "adapter_store_ttl_s": 5.0,
    "tool_call_parser": "auto",
}


def _default(opt: Opt) -> Any:
    env = os.environ.get(opt.env)
    if opt.dest == "cache_dir" and not env:
        env = os.environ.get("HOTLORA_CACHE")  # the older name, still read
    if env is not None and env != "":
        return env  # argparse converts string defaults with opt.type (and reports bad values)
    if opt.engine:
        default = EngineConfig.__dataclass_fields__[opt.dest].default
        return None if default is dataclasses.MISSING else default
    return _SERVE_DEFAULTS[opt.dest]


def _checked(opt: Opt) -> Any:
    """opt.type, plus the choices check that argparse skips for defaults (values from the environment)."""
    if not opt.choices:
        return opt.type

    def convert(text: str) -> Any:
        value = opt.type(text)
        if value not in opt.choices:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(opt.choices)} (from {opt.env}?)")
        return value

    convert.__name__ = opt.dest
    return convert


class _Switch(argparse.BooleanOptionalAction):
    """--x / --no-x whose string default (from the environment) argparse reads with parse_bool."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.type = parse_bool


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description="Serve a base model and its LoRA adapters over an OpenAI-compatible HTTP API. "
        "Each flag --x-y may also be set with the environment variable HOTLORA_X_Y.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _serve_flags(p)
    p.set_defaults(func=serve)


def switch_dests() -> set[str]:
    """The serve options given as --flag / --no-flag (not --flag VALUE), by argparse dest."""
    return {opt.dest for opt in SERVE_OPTIONS + _engine_extras() if opt.switch}


def _serve_flags(p: argparse.ArgumentParser) -> None:
    for opt in SERVE_OPTIONS + _engine_extras():
        if opt.switch:
            p.add_argument(f"--{opt.flag}", action=_Switch, default=_default(opt), help=f"{opt.help} [env {opt.env}]")
            continue
        p.add_argument(
            f"--{opt.flag}",
            type=_checked(opt),
            choices=opt.choices,
            default=_default(opt),
            metavar=None if opt.choices else opt.dest.upper(),
            help=f"{opt.help} [env {opt.env}]",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotlora",
        description="hotlora: many LoRA adapters on one 4-bit base model, behind an OpenAI-compatible API.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    add_serve_ray(sub, _serve_flags)
    add_adapters(sub)
    add_merge(sub)
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{o.dest: getattr(args, o.dest) for o in SERVE_OPTIONS + _engine_extras() if o.engine})


def server_settings(args: argparse.Namespace) -> Any:
    """ServerSettings from `serve` flags; ValueError for a bad combination."""
    from hotlora.server.api.auth import load_admin_token
    from hotlora.server.api.state import ServerSettings

    return ServerSettings(
        engine=engine_config(args),
        admin_token=load_admin_token(args.admin_token_file),
        served_model_name=args.served_model_name,
        max_upload_bytes=args.max_upload_bytes,
        max_body_bytes=args.max_body_bytes,
        shutdown_grace_s=args.shutdown_grace_s,
        adapter_store=args.adapter_store or None,
        s3_endpoint_url=args.s3_endpoint_url or None,
        adapter_store_ttl_s=args.adapter_store_ttl_s,
        gc_freeze=args.gc_freeze,
        tool_call_parser=args.tool_call_parser,
        allowed_lora_paths=args.allowed_lora_paths,
    )


def serve(args: argparse.Namespace) -> int:
    from hotlora.server.api.app import create_app, uvicorn_config
    from hotlora.server.api.shutdown import DrainingServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = server_settings(args)
    except ValueError as exc:
        print(f"hotlora serve: {exc}", file=sys.stderr)
        return 2
    token = settings.admin_token
    if token is None:
        logging.getLogger("hotlora").warning(
            "no admin token: the admin API answers 403 (set HOTLORA_ADMIN_TOKEN "
            "or --admin-token-file to enable uploads)"
        )
    sys.setswitchinterval(args.gil_switch_interval)
    app = create_app(settings)
    server = DrainingServer(
        uvicorn_config(app, args.log_level, 10, host=args.host, port=args.port),
        app.state.hotlora,
        args.shutdown_grace_s,
    )
    failure: list[BaseException] = []

    def fatal(exc: BaseException) -> None:
        failure.append(exc)
        server.should_exit = True

    app.state.hotlora.on_fatal = fatal
    server.run()
    if failure:
        print(f"hotlora serve: the model failed to load: {failure[0]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
