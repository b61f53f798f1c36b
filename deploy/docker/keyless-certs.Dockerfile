# syntax=docker/dockerfile:1
# keyless-certs (PKI command-line tool) image: a Rust builder stage, then the binary alone
# on distroless (no shell, no package manager), run as user nonroot.
#
# Build from the repository root (BuildKit; keyless-certs.Dockerfile.dockerignore keeps
# target/ out of the context):
#   docker build -f deploy/docker/keyless-certs.Dockerfile -t keyless-certs .
# Use, writing into a mounted directory as the calling user:
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/deploy:/out" keyless-certs \
#       init --out /out --domain example.com
#   docker run --rm -v "$PWD/deploy:/in:ro" keyless-certs inspect /in/origin/keyserver.crt

ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p keyless-certs --bin keyless-certs \
    && install -D -m 755 target/release/keyless-certs /out/usr/bin/keyless-certs \
    && strip --strip-unneeded /out/usr/bin/keyless-certs

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/bin/keyless-certs /usr/bin/keyless-certs
USER nonroot:nonroot
WORKDIR /home/nonroot
ENTRYPOINT ["/usr/bin/keyless-certs"]
CMD ["--help"]
