# streamcast: the daemon and CLI.
#   docker build -t streamcast .                                   # CPU image
#   docker build --build-arg VARIANT=gpu -t streamcast:gpu .        # CUDA wheels of TensorFlow
#   docker run --rm -e STREAMCAST_REDIS_URL=redis://redis:6379/0 -p 8000:8000 streamcast   # serve
#   docker run --rm -it streamcast demo                                                    # no server needed
# The GPU image needs the NVIDIA container toolkit on the host (docker run --gpus all ...);
# TensorFlow finds the GPU and the engine runs each batch as one call on it.
# Where no image can be pulled, deploy/docker/base-image.sh makes this base from Debian's
# packages and imports it under this name (README, "Docker").
FROM python:3.11-slim

# cpu | gpu: cpu installs tensorflow-cpu (TensorFlow without its CUDA kernels: 600 MB less);
# gpu installs the `gpu` extra (tensorflow[and-cuda]).
ARG VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    STREAMCAST_HTTP_HOST=0.0.0.0 \
    VIRTUAL_ENV=/opt/streamcast \
    PATH=/opt/streamcast/bin:$PATH

WORKDIR /src

# A virtual environment, so that the same steps work on the official image (Python in
# /usr/local) and on Debian's python3, whose pip refuses to install into the system (PEP 668).
# Dependencies before source: this layer is rebuilt only when pyproject.toml changes. TensorFlow's
# C++ headers (290 MB) serve only to compile custom ops, which nothing here does.
COPY pyproject.toml deploy/docker/requirements.py ./
RUN python3 -m venv "$VIRTUAL_ENV" \
    && python requirements.py "$VARIANT" > requirements.txt \
    && pip install -r requirements.txt \
    && rm -rf "$VIRTUAL_ENV"/lib/python3*/site-packages/tensorflow/include

COPY README.md ./
COPY streamcast ./streamcast
# Installed, not run from /src: `python -m streamcast.trainer` (the retrain child) must import
# the installed package, whatever the working directory.
RUN pip install --no-deps . && cd / && rm -rf /src

# A non-root user with a home for the model cache (~/.cache/streamcast/models).
RUN useradd --create-home --uid 10001 streamcast
USER streamcast
WORKDIR /home/streamcast

EXPOSE 8000
# Healthy = serving and Redis reachable (/readyz); start-up loads and compiles the model first.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["streamcast", "check", "--ready"]
# SIGTERM (docker stop): the daemon stops reading, finishes the batch in flight and exits 0
# within STREAMCAST_SHUTDOWN_TIMEOUT_S (10 s); give it more than that (docker run --stop-timeout
# 30, Compose's stop_grace_period, the StatefulSet's grace period), as docker stop's default 10 s
# leaves no time for TensorFlow's teardown.
STOPSIGNAL SIGTERM
ENTRYPOINT ["streamcast"]
CMD ["serve"]
