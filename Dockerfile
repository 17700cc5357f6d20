# A slim, non-root image running `opscore serve`; SQLite lives in the /data volume.
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
COPY pyproject.toml README.md ./
COPY opscore ./opscore
RUN pip install --no-cache-dir --no-deps .

USER opscore
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"
CMD ["opscore", "serve"]
