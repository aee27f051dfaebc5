"""`hotlora serve-ray`: the flags of `serve`, plus the replicas' own; Ray is imported only when it runs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any


def add_serve_ray(sub: Any, serve_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "serve-ray",
        help="run N replicas behind Ray Serve (pip install hotlora[ray])",
        description="Serve through Ray Serve: an ingress with the same OpenAI and admin API in front of N hotlora "
        "replicas (one GPU each, or the CPU), routed by adapter (Ray Serve model multiplexing), sharing one "
        "adapter store (--adapter-store s3://...). --host/--port are Ray Serve's HTTP proxy; each replica also "
        "listens on its own port (--replica-port and up) for /metrics. Takes every `serve` flag.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve_flags(p)
    p.add_argument("--replicas", type=int, default=2, help="hotlora replicas")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs per replica (default: 1 when --device is cuda or auto, else 0)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per replica")
    p.add_argument("--replica-host", default="0.0.0.0", help="address each replica's own server listens on")
    p.add_argument("--replica-port", type=int, default=8100,
                   help="first port for the replicas' own servers (/metrics); 0: any free port")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests Ray Serve hands one replica at once before routing elsewhere or queueing "
                   "(default: --max-num-seqs, a full batch)")
    p.add_argument("--ray-dashboard", action=argparse.BooleanOptionalAction, default=True,
                   help="start Ray's dashboard with a local cluster")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local one)")
    p.set_defaults(func=serve_ray)



def ray_app_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """hotlora.server.ray_serve.build_app's arguments from `serve-ray` flags."""
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if str(args.device).startswith(("cuda", "auto")) and _has_cuda() else 0.0
    from hotlora.server import cli

    return dict(settings=cli.server_settings(args), replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
                gpus_per_replica=gpus, host=args.replica_host, port=args.replica_port,
                max_ongoing_requests=args.max_ongoing_requests, gil_switch_interval=args.gil_switch_interval)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def serve_ray(args: argparse.Namespace) -> int:
    """Start (or join) a Ray cluster, deploy the ingress and the replicas, and block until interrupted."""
    import signal
    import threading


    try:
        import ray
        from ray import serve

        from hotlora.server.ray_serve import build_app
    except ImportError as exc:
        print(f"hotlora serve-ray: Ray Serve is not installed ({exc}); pip install 'hotlora[ray]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = build_app(**ray_app_kwargs(args))
    except ValueError as exc:
        print(f"hotlora serve-ray: {exc}", file=sys.stderr)
        return 2
    ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS") or None,
             include_dashboard=None if args.ray_dashboard else False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="hotlora", route_prefix="/", blocking=False)
    print(f"hotlora serve-ray: {args.replicas} replica(s) behind http://{args.host}:{args.port}", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0
