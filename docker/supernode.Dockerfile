# fedssl-supernode: a Flower SuperNode for one hospital, with the fedssl ClientApp's
# dependencies (torch/torchvision, the `kaggle` client). `fedssl-supernode` is flower-supernode
# plus a warm SuperExec beside it that forks one process per ClientApp task (torch imported
# once, not per message), so SuperNode and ClientApps live in this image. The hospital's
# facts come from `--node-config`; its images are mounted at /data, its decode cache lives in
# /var/lib/fedssl/cache:
#
#   fedssl-supernode --root-certificates /certs/ca.crt --superlink superlink:9092 \
#     --node-config 'hospital="hospital-1" ssl-task="simclr" data-source="ham10000" data-path="/data/ham10000"'
#
# Build from the repository root (see docker/README.md):
#   docker build -f docker/supernode.Dockerfile -t fedssl-supernode:dev .
#
# Build arguments:
#   BASE_IMAGE       Debian-based image; python3 (3.11), venv, tini and CA certificates are
#                    installed with apt when it lacks them.
#   TORCH_INDEX_URL  package index for torch/torchvision (default: PyTorch's CPU-only wheels,
#                    a few hundred MB instead of several GB of CUDA libraries).
#   PIP_INDEX_URL    package index for everything else (default: pip's, i.e. PyPI).

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- common stages: keep them identical in all three Dockerfiles (the image smoke test
# ---- checks this), so the images share the base and torch layers on disk and in registries.
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-e", "-u", "-o", "pipefail", "-c"]
# Install only what the base image lacks: python:3.11-slim has Python (in /usr/local) and CA
# certificates; scripts/make-base-image.sh has everything; a bare Debian has none of it.
# Versions come from the base image's Debian release (pinning them would break when the
# mirror moves on), and $pkgs is split into package names on purpose.
# hadolint ignore=DL3008,SC2086
RUN pkgs=""; \
    if ! command -v python3 >/dev/null; then pkgs="python3 python3-venv"; \
    elif ! python3 -c 'import ensurepip, venv' 2>/dev/null; then pkgs="python3-venv"; fi; \
    [ -x /usr/bin/tini ] || pkgs="$pkgs tini"; \
    [ -s /etc/ssl/certs/ca-certificates.crt ] || pkgs="$pkgs ca-certificates"; \
    if [ -n "$pkgs" ]; then \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; assert sys.version_info[:2] >= (3, 11), "fedssl needs Python >= 3.11, the base image has " + sys.version'
RUN groupadd --gid 10001 fedssl \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/fedssl --no-create-home --shell /usr/sbin/nologin fedssl \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/fedssl
# PATH in full: an image made with `docker import` has no PATH to extend.
ENV LANG=C.UTF-8 \
    PATH=/opt/fedssl/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_WARN_SCRIPT_LOCATION=1

# The torch/torchvision pins, read from pyproject.toml. The torch stage copies only this file,
# so a pyproject change that leaves the pins alone keeps the torch layer cached.
FROM base AS torch-pins
COPY docker/requirements.py pyproject.toml /build/
RUN python3 /build/requirements.py /build/pyproject.toml --only torch torchvision > /build/torch-requirements.txt

# torch and torchvision (with their own dependencies) in a directory of their own, which the
# venv puts on sys.path with a .pth file: the same layer in all three images.
FROM base AS torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --from=torch-pins /build/torch-requirements.txt /build/torch-requirements.txt
RUN python3 -m venv /opt/fedssl/venv \
 && echo /opt/fedssl/torch > "$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/fedssl-torch.pth"
# A proxy's CA certificate, if the build needs one, comes in as a secret (never a layer):
#   docker build --secret id=extra_ca,src=/etc/ssl/certs/ca-certificates.crt ...
RUN --mount=type=secret,id=extra_ca,required=false \
    --mount=type=cache,id=fedssl-pip,target=/root/.cache/pip \
    if [ -s /run/secrets/extra_ca ]; then export PIP_CERT=/run/secrets/extra_ca; fi; \
    pip install --target /opt/fedssl/torch --index-url "$TORCH_INDEX_URL" -r /build/torch-requirements.txt
# ---- end of common stages

# The service's dependencies (the `flower` extra) in the venv, then the fedssl packages.
FROM torch AS venv
ARG PIP_INDEX_URL
COPY docker/requirements.py pyproject.toml /build/
RUN python3 /build/requirements.py /build/pyproject.toml --extra flower > /build/requirements.txt
RUN --mount=type=secret,id=extra_ca,required=false \
    --mount=type=cache,id=fedssl-pip,target=/root/.cache/pip \
    if [ -z "${PIP_INDEX_URL:-}" ]; then unset PIP_INDEX_URL; fi; \
    if [ -s /run/secrets/extra_ca ]; then export PIP_CERT=/run/secrets/extra_ca; fi; \
    pip install -r /build/requirements.txt
COPY README.md /build/
COPY services /build/services
RUN --mount=type=secret,id=extra_ca,required=false \
    --mount=type=cache,id=fedssl-pip,target=/root/.cache/pip \
    if [ -z "${PIP_INDEX_URL:-}" ]; then unset PIP_INDEX_URL; fi; \
    if [ -s /run/secrets/extra_ca ]; then export PIP_CERT=/run/secrets/extra_ca; fi; \
    pip install --no-deps /build \
 && python3 -c 'import torch, torchvision, kaggle, fedssl_flower.client_app; assert torch.__file__.startswith("/opt/fedssl/torch/"), "torch was installed twice: " + torch.__file__' \
 && pip check

FROM base AS supernode
LABEL org.opencontainers.image.title="fedssl-supernode" \
      org.opencontainers.image.description="Flower SuperNode with the fedssl ClientApp (one hospital of a federated self-supervised learning run)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=torch /opt/fedssl/torch /opt/fedssl/torch
COPY --from=venv /opt/fedssl/venv /opt/fedssl/venv
# jemalloc, the ClientApp tasks' allocator (fedssl_flower/allocator.py: a lower memory peak per
# round than glibc's malloc, and faster steps); FEDSSL_CLIENTAPP_ALLOCATOR=jemalloc below makes
# its absence an error at start, not a quiet switch to glibc. scripts/make-base-image.sh has it.
# hadolint ignore=DL3008
RUN if ! ls /usr/lib/*-linux-gnu/libjemalloc.so.2 >/dev/null 2>&1; then \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libjemalloc2; \
      rm -rf /var/lib/apt/lists/*; \
    fi
# /data: the hospital's images, mounted read-only (or writable when the hospital downloads
# HAM10000 with Kaggle credentials), so it belongs to the service user.
RUN install -d -o 10001 -g 10001 -m 0750 /data
# FEDSSL_HOME: the default decode cache is $FEDSSL_HOME/cache (node config cache-dir overrides it).
ENV HOME=/var/lib/fedssl \
    FLWR_HOME=/var/lib/fedssl/flwr \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FEDSSL_HOME=/var/lib/fedssl \
    FEDSSL_CLIENTAPP_ALLOCATOR=jemalloc \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/fedssl
# FLWR_HOME (installed FABs) and the decode cache.
VOLUME ["/var/lib/fedssl"]
# tini reaps the ClientApp processes that Flower leaves behind as zombies.
ENTRYPOINT ["/usr/bin/tini", "--"]
# For `docker run` next to a SuperLink named `superlink` on a private network, with HAM10000
# mounted at /data/ham10000; the chart passes TLS options and each hospital's node config.
CMD ["fedssl-supernode", "--insecure", "--superlink", "superlink:9092", \
     "--node-config", "hospital=\"hospital-1\" data-source=\"ham10000\" data-path=\"/data/ham10000\""]
