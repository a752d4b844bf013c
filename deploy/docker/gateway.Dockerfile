# syntax=docker/dockerfile:1
# The gateway: pure Rust, no libtorch, no Python.
#   docker build -f deploy/docker/gateway.Dockerfile -t sdserve/gateway .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sd-gateway -p sdctl

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home sdserve
COPY --from=build /src/target/release/sd-gateway /src/target/release/sdctl /usr/local/bin/
USER 10001
ENV SD_LISTEN=0.0.0.0:50051 SD_HTTP_LISTEN=0.0.0.0:7860 SD_METRICS_LISTEN=0.0.0.0:9090
EXPOSE 50051 7860 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD ["sdctl", "probe", "--addr", "127.0.0.1:50051"]
ENTRYPOINT ["sd-gateway"]
