# syntax=docker/dockerfile:1
# keyless-edge image: a Rust builder stage, then the binary alone on distroless (glibc,
# libgcc, libssl, CA certificates; no shell, no package manager), run as user nonroot.
#
# Build from the repository root (BuildKit; keyless-edge.Dockerfile.dockerignore keeps
# target/ out of the context):
#   docker build -f deploy/docker/keyless-edge.Dockerfile -t keyless-edge .
# Run with the configuration and the edge's key-server identity (the files the comments of
# edge/debian/keyless-edge.toml list) mounted read-only, and a volume for the disk cache:
#   docker run -d --name keyless-edge -p 443:443 -p 80:80 \
#       -v /etc/keyless:/etc/keyless:ro -v keyless-edge-cache:/var/cache/keyless-edge \
#       keyless-edge
#   docker kill -s HUP keyless-edge        # reload, as `systemctl reload` does
#
# Ports 443 and 80 as a non-root user: Docker (20.10 and later) sets the container's
# net.ipv4.ip_unprivileged_port_start to 0; elsewhere (host networking, some Kubernetes
# runtimes) set that sysctl for the pod or listen on ports above 1023. Health checks from
# outside the container need [listen] admin = "0.0.0.0:9090" in the mounted configuration.

ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p keyless-edge --bin keyless-edge \
    && install -D -m 755 target/release/keyless-edge /out/usr/bin/keyless-edge \
    && strip --strip-unneeded /out/usr/bin/keyless-edge
# The distroless stage has no shell to make directories: they are made here.
RUN install -D -m 644 edge/debian/keyless-edge.toml /out/etc/keyless/keyless-edge.toml \
    && install -d -m 700 /out/var/lib/keyless-edge /out/var/cache/keyless-edge

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/bin/keyless-edge /usr/bin/keyless-edge
COPY --from=build /out/etc/keyless/ /etc/keyless/
COPY --from=build --chown=nonroot:nonroot /out/var/lib/keyless-edge /var/lib/keyless-edge
COPY --from=build --chown=nonroot:nonroot /out/var/cache/keyless-edge /var/cache/keyless-edge
USER nonroot:nonroot
VOLUME ["/var/cache/keyless-edge", "/var/lib/keyless-edge"]
EXPOSE 443 80
# SIGTERM drains client connections (10 s at most); give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/keyless-edge"]
CMD ["--config", "/etc/keyless/keyless-edge.toml"]
