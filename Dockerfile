# vipd as a container image: a build stage, then a slim runtime with iptables, ipvsadm
# and conntrack (for inspecting from inside: `docker exec vipd ipvsadm -Ln`).
#
#   docker build -t vipd .
#
# Both bases are arguments, so the image builds where no registry can be reached: the test
# suite (scripts/docker/vipd-image.sh) passes bases it made itself, a Debian tree with the
# runtime packages and one with a Rust toolchain, and vendored crates in vendor/.
#
# Run it with exactly what it needs (README, "Container image"):
#   docker run -d --name vipd --restart always \
#     --network host \
#     --cap-drop ALL --cap-add NET_ADMIN --cap-add NET_RAW --cap-add SYS_ADMIN \
#     --cap-add NET_BIND_SERVICE \
#     --security-opt systempaths=unconfined \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     -v /var/run/docker/netns:/var/run/docker/netns:rslave \
#     -v /run/netns:/run/netns:rshared \
#     -v vipd-state:/var/lib/vipd \
#     vipd run

ARG BUILDER_IMAGE=rust:1-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS build
# The etcd client's build compiles .proto files: protoc and the well-known types. A base
# that already has them (as the test suite's) needs no package index.
RUN if ! command -v protoc >/dev/null || [ ! -e /usr/include/google/protobuf/descriptor.proto ]; then \
      apt-get update && \
      apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev && \
      rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY . .
# Vendored crates (vendor/, when the context has them) build offline.
RUN if [ -d vendor ]; then \
      mkdir -p .cargo && \
      printf '[source.crates-io]\nreplace-with = "vendored"\n\n[source.vendored]\ndirectory = "vendor"\n' \
        > .cargo/config.toml; \
    fi && \
    cargo build --release --locked --bin vipd && \
    strip target/release/vipd

FROM ${RUNTIME_IMAGE} AS runtime
# A base that already has the tools (as the test suite's) needs no package index.
RUN if ! command -v ipvsadm >/dev/null || ! command -v iptables-restore >/dev/null || \
       ! command -v conntrack >/dev/null; then \
      apt-get update && \
      apt-get install -y --no-install-recommends iptables ipvsadm conntrack iproute2 && \
      rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /src/target/release/vipd /usr/local/bin/vipd
VOLUME /var/lib/vipd
ENTRYPOINT ["/usr/local/bin/vipd"]
CMD ["run"]
