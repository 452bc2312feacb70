# The prediction service: `docker build -t gated-prune . && docker run -p 8000:8000 gated-prune`
FROM python:3.11-slim

# CPU-only PyTorch wheels by default (~200 MB instead of several GB of CUDA libraries). An empty value
# installs torch from pip's default index instead (a CUDA build: larger image, same behaviour on CPU).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOST=0.0.0.0 \
    PORT=8000 \
    MODELS_DIR=/app/models

WORKDIR /app

# Dependencies first (pinned in requirements.lock): this layer is rebuilt only when they change.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock \
 && if [ -n "$TORCH_INDEX_URL" ]; then \
      pip install --no-cache-dir --no-deps --index-url "$TORCH_INDEX_URL" \
        "torch==${TORCH_VERSION}"; \
    else \
      pip install --no-cache-dir -c requirements.lock "torch==${TORCH_VERSION}"; \
    fi

COPY pyproject.toml README.md ./
COPY core ./core
COPY engine ./engine
COPY app ./app
COPY bench ./bench
RUN pip install --no-cache-dir --no-deps . \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app
# The shipped variants; mount a volume on MODELS_DIR (or set it) to serve others.
COPY models ./models

USER 10001
EXPOSE 8000
# Ready = every checkpoint verified and loaded (seconds); execution plans are applied in the background.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/ready', timeout=4).status == 200 else 1)"]
# On SIGTERM accepted requests get SHUTDOWN_GRACE_S (2 s) to finish, then the process exits.
STOPSIGNAL SIGTERM
CMD ["prune-serve"]
