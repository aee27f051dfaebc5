# hotlora server image.
#   docker build -t hotlora:cuda .                        CUDA 13.0 runtime + torch's default PyPI build (cu130)
#   docker build -t hotlora:cpu --build-arg VARIANT=cpu .  python slim + torch's CPU build (embedded SmolLM2)
# With podman add `--format docker`: podman's default OCI format has no HEALTHCHECK and drops it.
# Dependencies come from one place: the builder runs the Makefile's `install` target (the one `make serve`
# runs), with only the torch build and the install location swapped per variant.
# No `# syntax=` line: RUN --mount and COPY --chmod are in the Dockerfile frontend built into Docker 23+
# (BuildKit) and podman/buildah 4.3+, so a build needs no registry for a frontend image.
#
# Build arguments (today's values are the defaults; a mirror, another base or a local wheel needs no edit):
#   VARIANT       cuda or cpu
#   CUDA_IMAGE    the base of the cuda variant (must provide apt and CUDA 13.0, as torch's default wheel needs)
#   PYTHON_IMAGE  the base of the cpu variant (must provide python3 with venv, on a Debian-like system)
#   TORCH_SPEC    what pip installs as torch: a requirement, a wheel path or URL, or pip options before one
#   TORCH_INDEX   an extra package index for torch (pip --extra-index-url); empty: PyPI only
# Images are named in full (docker.io/...): podman resolves no short names unless registries.conf says how.
ARG VARIANT=cuda
ARG CUDA_IMAGE=docker.io/nvidia/cuda:13.0.2-runtime-ubuntu24.04
ARG PYTHON_IMAGE=docker.io/library/python:3.12-slim-bookworm

# ---- one base per variant: builder and runtime share it, so the venv's python is at the same path ----

# torch 2.13.0's default wheel on PyPI is built against CUDA 13.0 (it pulls cuda-toolkit 13.0 wheels) and
# pins its own triton (3.7.1), so TRITON_SPEC is left empty. The driver must support CUDA 13.0 (>= 580).
# gcc, libc6-dev and the Python headers stay in the runtime: Triton compiles its small C shim around the
# CUDA driver (triton/backends/nvidia/driver.c) on first use; without a C compiler no kernel launches.
# DL3006: the image is a build argument whose default above is pinned.
# hadolint ignore=DL3006
FROM ${CUDA_IMAGE} AS base-cuda
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
# DL3008: apt versions follow the pinned base image's release; exact pins break when the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv gcc libc6-dev libpython3.12-dev \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_SPEC="${TORCH_SPEC}" \
    TORCH_INDEX="${TORCH_INDEX}" \
    TRITON_SPEC="" \
    HOTLORA_DEVICE=cuda

# The CPU variant takes the CPU build of the same torch release; TRITON_SPEC stays the Makefile's default.
# hadolint ignore=DL3006
FROM ${PYTHON_IMAGE} AS base-cpu
ARG TORCH_SPEC="torch==2.13.0+cpu"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ENV TORCH_SPEC="${TORCH_SPEC}" \
    TORCH_INDEX="${TORCH_INDEX}" \
    HOTLORA_DEVICE=cpu

# ---- builder: compilers, make, and the venv ----
# DL3006: base-cuda and base-cpu are stages of this file, each pinned above.
# The `:-cuda` repeats VARIANT's default: podman 4.3 (buildah 1.28) picks the stages to build from the
# command line's build arguments alone, so without it `podman build .` skips base-cuda and then tries to pull
# an image called base-cuda.
# hadolint ignore=DL3006
FROM base-${VARIANT:-cuda} AS builder
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Makefile pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY adapters ./adapters
# make reads TORCH_SPEC, TORCH_INDEX and TRITON_SPEC from the environment the base stage set.
RUN --mount=type=cache,target=/root/.cache/pip \
    make install VENV=/opt/hotlora PY=python3 PROJECT_SPEC=. \
    && /opt/hotlora/bin/python -c "import hotlora.server, torch; print('torch', torch.__version__)"

# ---- runtime: the venv and nothing from the build ----
# hadolint ignore=DL3006
FROM base-${VARIANT:-cuda} AS runtime
ENV PATH=/opt/hotlora/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRITON_CACHE_DIR=/cache/triton \
    HOTLORA_HOST=0.0.0.0 \
    HOTLORA_PORT=8000 \
    HOTLORA_ADAPTER_DIR=/adapters \
    HOTLORA_CACHE_DIR=/cache
RUN groupadd --system --gid 10001 hotlora \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/hotlora hotlora \
    && mkdir -p /models /adapters /cache \
    && chown hotlora:hotlora /adapters /cache
COPY --from=builder /opt/hotlora /opt/hotlora
COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/hotlora-healthcheck
USER 10001:10001
WORKDIR /home/hotlora
EXPOSE 8000
VOLUME ["/models", "/adapters", "/cache"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["hotlora-healthcheck"]
ENTRYPOINT ["hotlora", "serve"]
