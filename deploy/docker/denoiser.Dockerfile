# syntax=docker/dockerfile:1
# The denoiser service. CPU: --build-arg TORCH_VARIANT=cpu (default); CUDA: =cuda.
#   docker build -f deploy/docker/denoiser.Dockerfile --build-arg TORCH_VARIANT=cuda -t sdserve/denoiser:cuda .
ARG TORCH_VARIANT=cpu

FROM rust:1.95-bookworm AS build
ARG TORCH_VARIANT
WORKDIR /src
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
    && if [ "$TORCH_VARIANT" = "cpu" ]; then \
         /opt/venv/bin/pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
       else \
         /opt/venv/bin/pip install --no-cache-dir torch==2.13.0; \
       fi
COPY . .
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH LIBTORCH_USE_PYTORCH=1
RUN cargo build --release --locked -p denoiser -p sdctl

FROM python:3.11-slim-bookworm AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(find /usr/lib -name libtcmalloc_minimal.so.4 -print -quit)" /usr/local/lib/libtcmalloc_minimal.so.4 \
    && useradd --system --uid 10001 --no-create-home sdserve
# libtorch at the path the binary's rpath names.
COPY --from=build /opt/venv/lib/python3.11/site-packages /opt/venv/lib/python3.11/site-packages
COPY --from=build /src/target/release/sd-denoiser /src/target/release/sdctl /usr/local/bin/
# The default model (models/emoji, 4 MB), served where SD_MODEL names no other.
COPY models/emoji /opt/sdserve/models/emoji
USER 10001
# tcmalloc for libtorch's allocations: 10-20% faster forwards on CPUs (docs/BENCHMARKS.md).
ENV LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4
ENV SD_LISTEN=0.0.0.0:50052 SD_METRICS_LISTEN=0.0.0.0:9090 SD_MODEL=/opt/sdserve/models/emoji
EXPOSE 50052 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s CMD ["sdctl", "probe", "--addr", "127.0.0.1:50052"]
ENTRYPOINT ["sd-denoiser"]
