"""`hotlora adapters upload|list|delete|load|unload`: a client of a running server's admin API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_adapters(sub: Any) -> None:
    p = sub.add_parser(
        "adapters",
        help="manage the adapters of a running server (admin API)",
        description="Talk to a running server's admin API. The token comes from --token, "
        "--token-file, or $HOTLORA_ADMIN_TOKEN.",
    )
    _client_flags(p, argparse.SUPPRESS)
    ops = p.add_subparsers(dest="op", required=True, metavar="{upload,list,delete,load,unload}")
    up = ops.add_parser("upload", help="upload (or replace) an adapter: a PEFT folder or a .tar.gz/.zip of one")
    up.add_argument("name")
    up.add_argument("path", type=Path)
    ls = ops.add_parser("list", help="list the registered adapters")
    ls.add_argument("--json", action="store_true", help="print the raw JSON")
    for op, what in (
        ("delete", "delete an adapter"),
        ("load", "pin an adapter on the device"),
        ("unload", "unpin an adapter"),
    ):
        ops.add_parser(op, help=what).add_argument("name")
    for op_parser in ops.choices.values():  # --url/--token/... also after the subcommand
        _client_flags(op_parser, argparse.SUPPRESS)
    p.set_defaults(
        url=os.environ.get("HOTLORA_URL", "http://127.0.0.1:8000"), token=None, token_file=None, timeout=300.0
    )
    p.set_defaults(func=adapters_command)


def _client_flags(p: argparse.ArgumentParser, default: Any) -> None:
    """The admin client's flags; SUPPRESS defaults, so that a flag given before or after the subcommand
    wins over the parser-level defaults."""
    p.add_argument("--url", default=default, help="server URL [env HOTLORA_URL] (default: http://127.0.0.1:8000)")
    tokens = p.add_mutually_exclusive_group()
    tokens.add_argument("--token", default=default, help="admin bearer token [env HOTLORA_ADMIN_TOKEN]")
    tokens.add_argument("--token-file", type=Path, default=default, help="file holding the admin token")
    p.add_argument("--timeout", type=float, default=default, help="seconds to wait for the server (default: 300)")


def adapters_command(args: argparse.Namespace) -> int:
    from hotlora.server.admin_client import AdminClient, AdminError

    if args.token and args.token_file:  # one before the subcommand, the other after it
        print("hotlora adapters: give --token or --token-file, not both", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("HOTLORA_ADMIN_TOKEN")
    if args.token_file:
        try:
            token = args.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            print(f"hotlora adapters: cannot read the token file {args.token_file}: {exc}", file=sys.stderr)
            return 2
    client = AdminClient(args.url, token, timeout=args.timeout)
    try:
        if args.op == "upload":
            print(json.dumps(client.upload(args.name, args.path), indent=2))
        elif args.op == "list":
            data = client.list()
            print(json.dumps(data, indent=2) if args.json else client.format_table(data))
        elif args.op == "delete":
            client.delete(args.name)
            print(f"deleted {args.name}")
        else:
            print(json.dumps(client.pin(args.name, args.op == "load"), indent=2))
    except AdminError as exc:
        print(f"hotlora adapters {args.op}: {exc}", file=sys.stderr)
        return 1
    return 0
