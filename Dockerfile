# streamcast: a first image (the daemon, health check and GPU variant come with later issues).
#   docker build -t streamcast .
#   docker run --rm -v "$PWD/../shared/data:/data:ro" -v "$PWD/runs:/runs" streamcast \
#       train --data /data/sinwave.csv --out /runs/sine
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3

WORKDIR /app

# Dependencies before source: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN mkdir streamcast && touch streamcast/__init__.py \
    && pip install . \
    && pip uninstall -y streamcast \
    && rm -rf streamcast build

COPY streamcast ./streamcast
RUN pip install --no-deps . && rm -rf build

RUN useradd --create-home --uid 10001 streamcast
USER streamcast

ENTRYPOINT ["streamcast"]
CMD ["--help"]
