# The agent's image: `docker build -t inferwatch .` from the repository's root.
# Build stage: the pinned toolchains, LLVM 22 and bpf-linker, installed by `cargo xtask build`
# exactly as on a developer's machine, then a release build with the kernel programs embedded.
FROM rust:1.98-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo xtask build --release \
    && install -D target/release/inferwatch /out/inferwatch

# Run stage: the one binary (glibc only; NVML is opened at run time from the driver's library,
# which the NVIDIA Container Toolkit or a hostPath mount provides).
FROM debian:bookworm-slim
COPY --from=build /out/inferwatch /usr/local/bin/inferwatch
# Root inside the container, so that the capabilities granted to it (see deploy/kubernetes)
# take effect; the agent drops all but three of them once its programs are attached.
USER 0
EXPOSE 9420
ENTRYPOINT ["/usr/local/bin/inferwatch"]
CMD ["run"]
