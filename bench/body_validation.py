"""Host time to parse and validate the largest request bodies the API accepts, which runs on the event loop (every
other client waits meanwhile): a /v1/completions prompt of token ids and a chat message of one-character text parts,
each just under --max-body-bytes. Medians of --rounds runs, on this machine's CPU.

    python bench/body_validation.py [--mib 8] [--rounds 3]

To compare builds in one sitting, put another build's packages first on PYTHONPATH (a folder holding
hotlora/{server,kernels,adapters} links to its checkout): the editable install is found after it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from hotlora.server.api import schemas


def bodies(size: int) -> dict[str, tuple[type, str]]:
    room = size - 4096
    part = json.dumps({"type": "text", "text": "a"}, separators=(",", ":"))
    ids = {"model": "m", "prompt": [7] * (room // 2)}  # "7," per id
    chat = {"model": "m", "messages": [{"role": "user", "content": [json.loads(part)] * (room // (len(part) + 1))}]}
    compact = {"separators": (",", ":")}
    return {"token ids": (schemas.CompletionRequest, json.dumps(ids, **compact)),
            "chat text parts": (schemas.ChatCompletionRequest, json.dumps(chat, **compact))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=8.0, help="body size (the server's default limit: 8 MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    for name, (model, body) in bodies(int(args.mib * (1 << 20))).items():
        parse, validate = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            data = json.loads(body)
            t1 = time.perf_counter()
            model.model_validate(data)
            validate.append(time.perf_counter() - t1)
            parse.append(t1 - t0)
        rows[name] = {"bytes": len(body), "parse_s": round(statistics.median(parse), 3),
                      "validate_s": round(statistics.median(validate), 3)}  # fmt: skip
    print(json.dumps({"schemas": schemas.__file__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
