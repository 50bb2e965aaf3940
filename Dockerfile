# syntax=docker/dockerfile:1
#
# godoxy-agent container image: one static (musl) binary in an empty image, run as an
# unprivileged numeric user. Configure it like GoDoxy's own agent container, with AGENT_NAME,
# AGENT_PORT, AGENT_CA_CERT, AGENT_SSL_CERT, RUNTIME and DOCKER_SOCKET (see docs/DEPLOY.md); a
# config file mounted at /etc/godoxy-agent/config.toml is read too. For the Docker API relay,
# mount the engine's socket and add its group, since the user is not root:
#   docker run ... -v /var/run/docker.sock:/var/run/docker.sock:ro \
#     --group-add "$(stat -c %g /var/run/docker.sock)" godoxy-agent
#
# Normal build (pulls rust:alpine for the builder stage, of the platform being built):
#   docker build -t godoxy-agent .
# Without any registry: build the static binary on the host and hand its folder in as the
# `builder` stage; the final stage is FROM scratch, so nothing is pulled and nothing runs in the
# image, for either architecture (no emulation needed to build the arm64 image):
#   x86_64 (linux/amd64):
#     cargo build --release --locked --bin godoxy-agent --target x86_64-unknown-linux-musl
#     install -d -m 0700 /tmp/ctx-amd64/state && cp target/x86_64-unknown-linux-musl/release/godoxy-agent /tmp/ctx-amd64/
#     podman build --format docker --platform linux/amd64 --build-context builder=/tmp/ctx-amd64 -t godoxy-agent:amd64 .
#   aarch64 (linux/arm64), with Debian's gcc-aarch64-linux-gnu for ring's C and the link:
#     CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc \
#     CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc \
#       cargo build --release --locked --bin godoxy-agent --target aarch64-unknown-linux-musl
#     install -d -m 0700 /tmp/ctx-arm64/state && cp target/aarch64-unknown-linux-musl/release/godoxy-agent /tmp/ctx-arm64/
#     podman build --format docker --platform linux/arm64 --build-context builder=/tmp/ctx-arm64 -t godoxy-agent:arm64 .
#   (docker buildx build --build-context builder=DIR --platform ... does the same.)
# scripts/release.sh does both, checks the size budget and joins the two images into one
# multi-arch manifest (podman manifest); see docs/DEPLOY.md#release-builds.

ARG RUST_IMAGE=docker.io/library/rust:1-alpine

# ---- builder: a static binary at /godoxy-agent -------------------------------------------
FROM ${RUST_IMAGE} AS builder
# ring compiles a little C; musl-dev gives the musl C toolchain bits on Alpine.
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin godoxy-agent \
 && install -m 0755 target/release/godoxy-agent /godoxy-agent \
 && install -d -m 0700 /state

# ---- final: nothing but the binary -------------------------------------------------------
FROM scratch
LABEL org.opencontainers.image.title="godoxy-agent" \
      org.opencontainers.image.description="GoDoxy agent: mTLS TCP and DTLS UDP tunnels" \
      org.opencontainers.image.source="https://github.com/yusing/godoxy" \
      org.opencontainers.image.licenses="MIT"
# The labels of GoDoxy's own agent image: a GoDoxy server that lists this host's containers
# (through this agent) makes no route of the agent's container (proxy.exclude) and does not
# health-check it (proxy.#1...: its first route). A key holding `#` must be quoted here.
LABEL proxy.exclude="1" \
      "proxy.#1.healthcheck.disable"="true"
COPY --from=builder --chmod=0755 /godoxy-agent /godoxy-agent
# The metrics history's folder, owned by the user the agent runs as: a named volume mounted
# here starts with this owner, so the agent can write its history without root.
COPY --from=builder --chown=65532:65532 /state /var/lib/godoxy-agent
# GoDoxy's agent port: TLS (tunnels + HTTP API) on TCP, DTLS (UDP tunnels) on UDP.
EXPOSE 8890/tcp 8890/udp
# Unprivileged; the image has no /etc/passwd, so the id is numeric.
USER 65532:65532
# `health` reads the same environment as `run` (AGENT_PORT, AGENT_CA_CERT): both listeners
# must answer a handshake on 127.0.0.1 with a certificate from that CA. It needs no client
# certificate, so none has to be shipped to the agent's host. (With a client set mounted at
# /certs, `probe --server 127.0.0.1:8890 --all --certs /certs` runs GoDoxy's own probes.)
HEALTHCHECK --interval=30s --timeout=10s --start-period=5s --retries=3 \
    CMD ["/godoxy-agent", "health", "--timeout", "3s"]
ENTRYPOINT ["/godoxy-agent"]
CMD ["run"]
