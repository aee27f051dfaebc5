"""The container engine side of `make test-container`: podman or docker, a local base image, a wheel server.

Everything here shells out to the engine's own CLI, so what is tested is what a user types. A problem that
stops the test (no engine, no mmdebstrap, no torch wheel) raises `Unusable` with what to do about it.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# What the Dockerfile's CPU base must provide (python3 with venv); ca-certificates for pip's TLS.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Docs, man pages and translations are not needed in an image (keeps the local base ~40% smaller).
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
# The host's own extra CAs (a TLS-inspecting proxy's, say) must be trusted inside the build too, and pip
# reads the system bundle only when told to.
CA_HOOK = (
    'set -e; if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then '
    'cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/"; '
    'chroot "$1" update-ca-certificates >/dev/null; fi; '
    'printf "[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n" > "$1/etc/pip.conf"'
)


class Unusable(RuntimeError):
    """The test cannot run here; the message says why and what to install or set."""


def log(message: str) -> None:
    print(f"[test-container {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: Sequence[str], timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    """Run a command with captured text output; a failure raises with the command and its stderr's tail."""
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        tail = (out.stderr or out.stdout).strip()[-2000:]
        raise RuntimeError(f"`{' '.join(cmd)}` exited {out.returncode}:\n{tail}")
    return out


def stream(cmd: Sequence[str], timeout: float, attempts: int = 1, **kw) -> None:
    """Run a long command with its output going to ours (the CI log); retried for network hiccups."""
    for attempt in range(1, attempts + 1):
        try:
            subprocess.run(list(cmd), check=True, timeout=timeout, **kw)
            return
        except subprocess.CalledProcessError as exc:
            if attempt == attempts:
                raise RuntimeError(f"`{' '.join(cmd[:3])} ...` exited {exc.returncode} (output above)") from None
            log(f"exited {exc.returncode}; retrying ({attempt + 1}/{attempts}) in 10 s")
            time.sleep(10)


def ulimit_flags() -> list[str]:
    """Explicit limits within this process's hard limits.

    podman run as root asks the runtime for nofile=1048576 and nproc=4194304 by default; where the caller
    lacks CAP_SYS_RESOURCE (inside a VM sandbox or a container) runc then fails with "error setting rlimits
    ... operation not permitted". nproc counts threads: 4096 is plenty for one server."""
    _, nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, nproc = resource.getrlimit(resource.RLIMIT_NPROC)
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
    nproc = 4096 if nproc == resource.RLIM_INFINITY else min(nproc, 4096)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


@dataclass(frozen=True, slots=True)
class Engine:
    name: str  # "podman" or "docker": both take the same commands below

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([self.name, *args], timeout=timeout, check=check)

    def build_flags(self) -> list[str]:
        # podman writes OCI images by default, and the OCI image config has no HEALTHCHECK: it is dropped.
        return ["--format", "docker"] if self.name == "podman" else []

    def exists(self, kind: str, name: str) -> bool:
        return self(kind, "inspect", name, check=False).returncode == 0

    def healthcheck_test(self, image: str) -> list[str]:
        """The image's HEALTHCHECK command as its config stores it (["CMD", ...] or ["CMD-SHELL", "..."])."""
        config = json.loads(self("image", "inspect", image).stdout)[0]
        # docker keeps it under Config, podman at the top level of its inspect output
        health = (config.get("Config") or {}).get("Healthcheck") or config.get("Healthcheck") or {}
        return list(health.get("Test") or [])

    def remove(self, kind: str, name: str) -> None:
        """Best-effort removal, for clean-up (never raises: one failed removal must not stop the others)."""
        args = {"container": ["rm", "-f", "-v"], "volume": ["volume", "rm", "-f"], "image": ["rmi", "-f"]}[kind]
        try:
            out = self(*args, name, timeout=120, check=False)
        except subprocess.TimeoutExpired:
            log(f"removing {kind} {name} timed out")
            return
        if out.returncode != 0 and self.exists(kind, name):
            log(f"could not remove {kind} {name}: {out.stderr.strip()[-300:]}")


def detect_engine(requested: str) -> Engine:
    """podman, else docker (or the one asked for), whichever answers `info`: a docker CLI with no daemon
    behind it does not count."""
    problems = []
    for name in [requested] if requested else ["podman", "docker"]:
        if shutil.which(name) is None:
            problems.append(f"{name}: not installed")
            continue
        try:
            out = run([name, "info"], timeout=60, check=False)
        except subprocess.TimeoutExpired:
            problems.append(f"{name}: `{name} info` did not answer within 60 s")
            continue
        if out.returncode == 0:
            return Engine(name)
        problems.append(f"{name}: `{name} info` exited {out.returncode}: {out.stderr.strip()[-400:]}")
    raise Unusable(
        "no usable container engine:\n  " + "\n  ".join(problems) + "\nInstall podman (Debian/Ubuntu: "
        "apt-get install podman runc) or start Docker's daemon, or name one with CONTAINER_ENGINE=podman|docker."
    )


def build_local_base(engine: Engine, tag: str, suite: str, mirror: str, workdir: Path) -> None:
    """A minimal Debian `suite` with python3-venv, made by mmdebstrap and imported as `tag`: the stand-in for
    PYTHON_IMAGE where no registry can be reached."""
    if shutil.which("mmdebstrap") is None:
        raise Unusable("CONTAINER_BASE=local needs mmdebstrap (apt-get install mmdebstrap); or CONTAINER_BASE=registry")
    if os.geteuid() != 0:
        raise Unusable("CONTAINER_BASE=local builds its base with mmdebstrap as root: run as root, or use registry")
    tarball = workdir / "base.tar"
    cmd = [
        "mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
        *[f"--dpkgopt=path-exclude={path}" for path in DPKG_EXCLUDES],
        f"--customize-hook={CA_HOOK}", suite, str(tarball), mirror,
    ]  # fmt: skip
    log(f"building the base image {tag}: Debian {suite} from {mirror} (mmdebstrap)")
    stream(cmd, timeout=600, attempts=3)
    engine("import", str(tarball), tag, timeout=600)
    tarball.unlink()


def python_tag(engine: Engine, image: str) -> str:
    """The wheel tag of the image's python3, e.g. "cp311"."""
    out = engine("run", "--rm", *ulimit_flags(), "--entrypoint", "python3", image, "-c",
                 "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")  # fmt: skip
    return out.stdout.strip()


def find_torch_wheel(given: str, version: str, tag: str) -> Path:
    """TORCH_WHEEL, else torch-<version>+cpu-<tag>-*.whl in pip's find-links folders or /opt/wheels."""
    if given:
        wheel = Path(given)
        if not wheel.is_file():
            raise Unusable(f"TORCH_WHEEL={given} is not a file")
        if f"-{tag}-" not in wheel.name:
            raise Unusable(f"TORCH_WHEEL={given} is not for the base image's python ({tag})")
        return wheel
    folders = [*os.environ.get("PIP_FIND_LINKS", "").split(), "/opt/wheels"]
    pattern = f"torch-{version}+cpu-{tag}-*.whl"
    for folder in folders:
        if Path(folder).is_dir() and (found := sorted(Path(folder).glob(pattern))):
            return found[-1]
    raise Unusable(
        f"no CPU torch wheel {pattern} in {', '.join(folders)}: set TORCH_WHEEL=/path/to/{pattern} "
        "(pip download --no-deps --index-url https://download.pytorch.org/whl/cpu torch==" + version + "+cpu "
        "fetches one), or use CONTAINER_BASE=registry"
    )


@contextmanager
def wheel_server(wheel: Path, workdir: Path) -> Iterator[str]:
    """Serve the one wheel on loopback for the build (run with --network host) and yield the find-links URL.
    Unlike a bind mount in the build, this works the same for podman and docker."""
    folder = workdir / "wheels"
    folder.mkdir()
    (folder / wheel.name).symlink_to(wheel.resolve())
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def torch_version(spec: str) -> str:
    match = re.fullmatch(r"torch==([0-9][^+\s]*)", spec.strip())
    if not match:
        raise Unusable(f"TORCH_SPEC={spec!r}: expected torch==<version>")
    return match.group(1)


def container_logs(engine: Engine, name: str, lines: int = 60) -> str:
    out = engine("logs", "--tail", str(lines), name, check=False)
    return (out.stdout + out.stderr).strip()


if __name__ == "__main__":
    sys.exit("run tests/container_e2e.py (make test-container)")
