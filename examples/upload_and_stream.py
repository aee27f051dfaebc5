"""Upload a PEFT adapter into a running server, then stream a chat answer through it with the openai client.

    HOTLORA_ADMIN_TOKEN=secret hotlora serve &            # or: make serve, with the token set
    HOTLORA_ADMIN_TOKEN=secret .venv/bin/python examples/upload_and_stream.py my-adapter /path/to/peft/folder
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import openai

URL = os.environ.get("HOTLORA_URL", "http://127.0.0.1:8000")


def upload(name: str, folder: Path) -> None:
    files = [(f, (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    r = httpx.post(f"{URL}/admin/adapters/{name}", files=files, timeout=120,
                   headers={"Authorization": f"Bearer {os.environ['HOTLORA_ADMIN_TOKEN']}"})
    r.raise_for_status()
    info = r.json()
    print(f"uploaded {info['name']}: r={info['rank']}, targets {', '.join(info['target_modules'])}")


def main(name: str, folder: str) -> None:
    upload(name, Path(folder))
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Say hello in three languages."}],
        max_tokens=64, temperature=0.0, stream=True,
    )
    for chunk in stream:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
