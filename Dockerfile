# A slim, non-root image running `opscore serve`; SQLite lives in the /data volume.
# No key or secret is baked in: OPSCORE_API_KEY (and OPSCORE_WEBHOOK_SECRET) come from the
# environment at `docker run` / `docker compose up` time (.env is not copied: .dockerignore).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    OPSCORE_DATABASE_URL=sqlite:////data/opscore.db \
    OPSCORE_HOST=0.0.0.0 OPSCORE_PORT=8000

RUN apt-get update && apt-get install -y --no-install-recommends graphviz \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 opscore \
    && mkdir /data && chown opscore /data

WORKDIR /app
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md LICENSE ./
COPY opscore ./opscore
RUN pip install --no-cache-dir --no-deps .

USER opscore
VOLUME ["/data"]
EXPOSE 8000
# SIGTERM (docker stop) shuts down gracefully: open requests finish, every log line is written,
# exit status 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/health' % os.environ.get('OPSCORE_PORT', '8000'); sys.exit(urllib.request.urlopen(url, timeout=2).status != 200)"]
CMD ["opscore", "serve"]
