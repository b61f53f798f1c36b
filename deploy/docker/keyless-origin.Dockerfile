# syntax=docker/dockerfile:1
# keyless-origin (key server) image: a Rust builder stage, then the binary alone on
# distroless (glibc, libgcc, libssl, CA certificates; no shell, no package manager), run as
# user nonroot.
#
# Build from the repository root (BuildKit; keyless-origin.Dockerfile.dockerignore keeps
# target/ out of the context):
#   docker build -f deploy/docker/keyless-origin.Dockerfile -t keyless-origin .
# Run with the configuration, the key server's identity and the site keys (the files the
# comments of origin/debian/keyless-origin.toml list) mounted read-only, readable by uid
# 65532, and a volume for state_dir:
#   docker run -d --name keyless-origin -p 2407:2407 \
#       -v /etc/keyless:/etc/keyless:ro -v keyless-origin-state:/var/lib/keyless-origin \
#       keyless-origin
#   docker kill -s HUP keyless-origin      # reload keys, groups and TLS files
#
# Metrics listen on 127.0.0.1:2406 by default: set metrics_listen = "0.0.0.0:2406" in the
# mounted configuration (and publish it only to the monitoring network) to scrape them.
# PKCS#11 key stores need the token's module in the image: for them, end in a
# debian:bookworm-slim stage with the vendor's module installed (and USER set) instead.

ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p keyless-origin --bin keyless-origin \
    && install -D -m 755 target/release/keyless-origin /out/usr/bin/keyless-origin \
    && strip --strip-unneeded /out/usr/bin/keyless-origin
# The distroless stage has no shell to make directories: they are made here.
RUN install -D -m 644 origin/debian/keyless-origin.toml /out/etc/keyless/keyless-origin.toml \
    && install -d -m 700 /out/var/lib/keyless-origin

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/bin/keyless-origin /usr/bin/keyless-origin
COPY --from=build /out/etc/keyless/ /etc/keyless/
COPY --from=build --chown=nonroot:nonroot /out/var/lib/keyless-origin /var/lib/keyless-origin
USER nonroot:nonroot
VOLUME ["/var/lib/keyless-origin"]
EXPOSE 2407
# SIGTERM drains edge connections (shutdown_timeout, 10 s by default).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/keyless-origin"]
CMD ["--config", "/etc/keyless/keyless-origin.toml"]
