"""`make test-container`: build the CPU image, run it as a user would, and check it serves.

Builds the Dockerfile's cpu variant with podman (else docker), runs it with named volumes for /adapters and
/cache, the admin token as a read-only file, and the API published on a loopback port, then checks: /ready;
the admin API refuses a wrong token; an upload of a peft-saved adapter and a completion through it (which
must differ from the base model's); `hotlora adapters list` inside; that the server is not root; the image's
own HEALTHCHECK command; and that after a restart the adapter is still there and answers the same. Whatever
it made (container, volumes, images, files) is removed at the end, pass or fail (CONTAINER_KEEP=1 keeps the
images). Exit 0 only when every check passed; 2 when it cannot run here (the message says why).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from container_engine import (
    Engine,
    Unusable,
    build_local_base,
    container_logs,
    detect_engine,
    find_torch_wheel,
    log,
    python_tag,
    stream,
    torch_version,
    ulimit_flags,
    wheel_server,
)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "/run/secrets/hotlora_admin_token"
ADAPTER = "container-test"
PROMPT = "The capital of France is"
READY_TIMEOUT = 600  # first start converts the embedded GGUF into /cache: ~1 min on 2 cores, slower when shared


class Checks:
    """Named checks; the run stops at the first failure (later ones depend on it)."""

    def __init__(self) -> None:
        self.passed: list[str] = []

    def __call__(self, name: str, ok: bool, detail: str = "") -> None:
        if not ok:
            raise AssertionError(f"{name}: {detail}")
        self.passed.append(name)
        log(f"ok: {name}")


def make_adapter(out: Path) -> Path:
    """A real peft-saved LoRA adapter on the embedded SmolLM2-135M (the model the CPU image serves)."""
    from lora_factory import save_adapter
    from transformers import AutoModelForCausalLM

    from hotlora.server.model.weights import DEFAULT_MODEL, resolve_checkpoint

    os.environ["HF_HUB_OFFLINE"] = "1"
    # The cache tests/conftest.py uses: the model `make test` converted is reused.
    cache = Path(os.environ.get("HOTLORA_CACHE", ROOT / ".cache" / "hotlora"))
    checkpoint = resolve_checkpoint(DEFAULT_MODEL, cache, progress=False)
    base = AutoModelForCausalLM.from_pretrained(str(checkpoint.path), local_files_only=True)
    return save_adapter(base, out, seed=3, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(engine: Engine, container: str, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        state = engine("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
        if state in {"exited", "dead", "stopped"}:
            raise AssertionError(f"the container stopped ({state}):\n{container_logs(engine, container)}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"/ready not 200 after {READY_TIMEOUT} s:\n{container_logs(engine, container)}")


def complete(url: str, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    if r.status_code != 200:
        raise AssertionError(f"completion with model {model!r}: {r.status_code} {r.text[:500]}")
    return r.json()["choices"][0]["text"]


def build_image(engine: Engine, args: argparse.Namespace, tag: str, work: Path, stack: ExitStack) -> None:
    flags = [*engine.build_flags(), "--build-arg", "VARIANT=cpu", *ulimit_flags()]
    if engine.name == "podman" and not args.keep:
        flags.append("--layers=false")  # no intermediate images left behind (and none reused)
    if args.base == "local":
        base = f"localhost/hotlora-test-base:{args.suite}-{os.getpid()}"
        stack.callback(cleanup_image, engine, base, args.keep)
        build_local_base(engine, base, args.suite, args.mirror, work)
        version = torch_version(args.torch)
        wheel = find_torch_wheel(args.torch_wheel, version, python_tag(engine, base))
        log(f"torch from {wheel}")
        flags += ["--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", "TORCH_INDEX="]
        if engine.name == "podman":  # as the README says: the wheel's folder mounted into the build
            flags += ["--volume", f"{wheel.parent}:/wheels:ro", "--build-arg", f"TORCH_SPEC=/wheels/{wheel.name}"]
        else:  # `docker build` mounts no host folders: the wheel is served on loopback instead
            links = stack.enter_context(wheel_server(wheel, work))
            flags += ["--network", "host", "--build-arg", f"TORCH_SPEC=--find-links {links} torch=={version}+cpu"]
    stack.callback(cleanup_image, engine, tag, args.keep)
    cmd = [engine.name, "build", *flags, "-t", tag, str(ROOT)]
    log(f"building the CPU image (several minutes): {shlex.join(cmd)}")
    started = time.monotonic()
    stream(cmd, timeout=1200, attempts=2)  # ~5 min on 2 cores; a retry for a registry or mirror hiccup
    log(f"built in {time.monotonic() - started:.0f} s")


def cleanup_image(engine: Engine, image: str, keep: bool) -> None:
    if keep:
        log(f"kept image {image} (CONTAINER_KEEP=1)")
    else:
        engine.remove("image", image)


def start(engine: Engine, run_args: list[str]) -> None:
    engine("run", "-d", *run_args, timeout=300)


def exercise(engine: Engine, image: str, work: Path, stack: ExitStack, check: Checks) -> None:
    """Run the image and check it; clean-up of what it creates is registered on `stack`."""
    tag = f"hotlora-test-{os.getpid()}"
    container, volumes = tag, {f"{tag}-adapters": "/adapters", f"{tag}-cache": "/cache"}
    token = work / "admin_token"
    token.write_text(os.urandom(24).hex() + "\n")
    token.chmod(0o644)  # the server runs as uid 10001 and must read it
    adapter = make_adapter(work / "adapter")
    for volume in volumes:
        stack.callback(engine.remove, "volume", volume)
        engine("volume", "create", volume)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mounts = [f"--volume={v}:{target}" for v, target in volumes.items()]
    stack.callback(engine.remove, "container", container)
    start(engine, ["--name", container, "-p", f"127.0.0.1:{port}:8000", *mounts, *ulimit_flags(),
                   f"--volume={token}:{SECRET}:ro", "-e", f"HOTLORA_ADMIN_TOKEN_FILE={SECRET}", image])  # fmt: skip
    log(f"started {container} on {url}; waiting for /ready (first start converts the model)")
    wait_ready(engine, container, url)
    check("/ready", True)
    check("/health", httpx.get(f"{url}/health", timeout=10).status_code == 200)
    auth = {"Authorization": f"Bearer {token.read_text().strip()}"}
    check_identity(engine, container, check)
    check_healthcheck(engine, image, container, check)
    (base_model,) = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
    base_text = complete(url, base_model)
    upload(url, adapter, auth, check)
    adapter_text = complete(url, ADAPTER)
    check("completion through the adapter differs from the base", adapter_text != base_text, repr(adapter_text))
    listed = engine("exec", container, "hotlora", "adapters", "--token-file", SECRET, "list").stdout
    check("`hotlora adapters list` inside the container", ADAPTER in listed, listed)
    log("restarting the container")
    engine("restart", "-t", "30", container, timeout=300)
    wait_ready(engine, container, url)
    models = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
    check("the adapter survives a restart (/v1/models)", ADAPTER in models, str(models))
    again = complete(url, ADAPTER)
    check("after the restart the adapter answers the same", again == adapter_text, f"{again!r} != {adapter_text!r}")


def upload(url: str, adapter: Path, auth: dict[str, str], check: Checks) -> None:
    def files() -> list[tuple[str, tuple[str, bytes]]]:
        return [("files", (p.name, p.read_bytes())) for p in sorted(adapter.iterdir()) if p.is_file()]

    wrong = httpx.post(f"{url}/admin/adapters/{ADAPTER}", files=files(), timeout=60,
                       headers={"Authorization": "Bearer not-the-token"})  # fmt: skip
    check("the admin API refuses a wrong token", wrong.status_code in {401, 403}, str(wrong.status_code))
    r = httpx.post(f"{url}/admin/adapters/{ADAPTER}", files=files(), headers=auth, timeout=120)
    check("upload of a peft-saved adapter (token from the mounted file)", r.status_code == 201, r.text[:300])


def check_identity(engine: Engine, container: str, check: Checks) -> None:
    status = engine("exec", container, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    check("the server (pid 1) is not root", "0" not in uids, f"Uid: {uids}")
    check("it runs as uid 10001", set(uids) == {"10001"}, f"Uid: {uids}")


def check_healthcheck(engine: Engine, image: str, container: str, check: Checks) -> None:
    test = engine.healthcheck_test(image)
    check("the image has a HEALTHCHECK", bool(test) and test[0] in {"CMD", "CMD-SHELL"}, str(test))
    cmd = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
    out = engine("exec", container, *cmd, check=False)
    check(f"the HEALTHCHECK command {cmd} passes", out.returncode == 0, out.stderr[-500:])
    if engine.name == "podman":
        out = engine("healthcheck", "run", container, check=False)
        check("`podman healthcheck run`", out.returncode == 0, (out.stdout + out.stderr)[-500:])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="", help="podman or docker (default: podman if it works, else docker)")
    p.add_argument("--base", choices=["local", "registry"], default="local")
    p.add_argument("--suite", default="bookworm")
    p.add_argument("--mirror", default="http://deb.debian.org/debian")
    p.add_argument("--torch", default="torch==2.13.0", help="the Makefile's TORCH_SPEC")
    p.add_argument("--torch-wheel", default="")
    p.add_argument("--keep", type=lambda s: s not in {"", "0", "false", "no"}, default=False)
    p.add_argument("--image", default="", help="test this already built image instead of building one")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # CI ends a run with SIGTERM: leave through `finally`, so the clean-up still happens.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started, check, code = time.monotonic(), Checks(), 0
    try:
        with ExitStack() as stack:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hotlora-container-")))
            engine = detect_engine(args.engine)
            log(f"engine: {engine.name} ({engine('--version').stdout.strip()}); base: {args.base}")
            image = args.image or f"localhost/hotlora-test:cpu-{os.getpid()}"
            if not args.image:
                build_image(engine, args, image, work, stack)
            exercise(engine, image, work, stack, check)
            log("cleaning up")
    except Unusable as exc:
        log(f"cannot run here: {exc}")
        return 2
    except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError, httpx.HTTPError) as exc:
        log(f"FAILED: {exc}")
        code = 1
    log(f"{time.monotonic() - started:.0f} s in all")
    print(f"{len(check.passed)} passed, {1 if code else 0} failed", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
