# streamcast: the daemon and CLI (health check and GPU variant come with a later issue).
#   docker build -t streamcast .
#   docker run --rm -e STREAMCAST_REDIS_URL=redis://redis:6379/0 -p 8000:8000 streamcast   # serve
#   docker run --rm -it streamcast demo                                                    # no server needed
FROM python:3.11-slim AS base

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
    && pip install . \
    && pip uninstall -y streamcast \
    && rm -rf streamcast build

COPY streamcast ./streamcast
RUN pip install --no-deps . && rm -rf build

RUN useradd --create-home --uid 10001 streamcast
USER streamcast

EXPOSE 8000
ENTRYPOINT ["streamcast"]
CMD ["serve"]
