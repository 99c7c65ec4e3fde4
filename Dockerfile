# dcmstatus: the service image. Bring your own NATS and PostgreSQL with
# DCMSTATUS_NATS_URL and DCMSTATUS_DATABASE_URL, or run with neither for the
# embedded servers (data under /data).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DCMSTATUS_HTTP_HOST=0.0.0.0 \
    DCMSTATUS_DATA_DIR=/data

RUN useradd --create-home --uid 10001 dcmstatus \
 && mkdir /data && chown dcmstatus:dcmstatus /data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY dcmstatus ./dcmstatus
RUN pip install --no-cache-dir . && rm -rf /src

USER dcmstatus
WORKDIR /data
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/api/v1/health').status == 200 else 1)"
ENTRYPOINT ["dcmstatus", "serve"]
