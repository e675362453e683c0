# streamcast: the daemon and CLI.
#   docker build -t streamcast .                                   # CPU image
#   docker build --build-arg VARIANT=gpu -t streamcast:gpu .        # CUDA wheels of TensorFlow
#   docker run --rm -e STREAMCAST_REDIS_URL=redis://redis:6379/0 -p 8000:8000 streamcast   # serve
#   docker run --rm -it streamcast demo                                                    # no server needed
# The GPU image needs the NVIDIA container toolkit on the host (docker run --gpus all ...);
# TensorFlow finds the GPU and the engine runs each batch as one call on it.
FROM python:3.11-slim AS base

# cpu | gpu: the gpu variant installs the `gpu` extra (tensorflow[and-cuda]).
ARG VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    STREAMCAST_HTTP_HOST=0.0.0.0

WORKDIR /app

# Dependencies before source: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN mkdir streamcast && touch streamcast/__init__.py \
    && if [ "$VARIANT" = gpu ]; then pip install ".[gpu]"; else pip install .; fi \
    && pip uninstall -y streamcast \
    && rm -rf streamcast build

COPY streamcast ./streamcast
RUN pip install --no-deps . && rm -rf build

# A non-root user with a home for the model cache (~/.cache/streamcast/models).
RUN useradd --create-home --uid 10001 streamcast
USER streamcast

EXPOSE 8000
# Healthy = serving and Redis reachable (/readyz); start-up loads and compiles the model first.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["streamcast", "check", "--ready"]
ENTRYPOINT ["streamcast"]
CMD ["serve"]
