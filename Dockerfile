# syntax=docker/dockerfile:1
# The agent's image, for x86-64 and arm64 (GH200/GB200 nodes) from one Dockerfile:
#   docker buildx build --platform linux/amd64,linux/arm64 -t inferwatch .
# Build stage: runs on the builder's own architecture and cross-compiles for the target's
# (`cargo xtask build --target`: the pinned toolchains, LLVM 22, bpf-linker and Debian's cross
# gcc, installed exactly as on a developer's machine; the kernel programs are built for the
# target's registers and embedded).
FROM --platform=$BUILDPLATFORM rust:1.98-bookworm AS build
ARG TARGETARCH
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    case "$TARGETARCH" in \
      amd64) triple=x86_64-unknown-linux-gnu ;; \
      arm64) triple=aarch64-unknown-linux-gnu ;; \
      *) echo "unsupported architecture: $TARGETARCH (amd64 or arm64)" >&2; exit 1 ;; \
    esac \
    && cargo xtask build --release --target "$triple" \
    && install -D "target/$triple/release/inferwatch" /out/inferwatch

# Run stage, of the target's architecture: the one binary (glibc only; NVML is opened at run
# time from the driver's library, which the NVIDIA Container Toolkit or a hostPath mount provides).
FROM debian:bookworm-slim
COPY --from=build /out/inferwatch /usr/local/bin/inferwatch
# Root inside the container, so that the capabilities granted to it (see deploy/kubernetes)
# take effect; the agent drops all but three of them once its programs are attached.
USER 0
EXPOSE 9420
ENTRYPOINT ["/usr/local/bin/inferwatch"]
CMD ["run"]
