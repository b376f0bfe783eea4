# syntax=docker/dockerfile:1
# Build stage: compile wheels with the build tools; none of them reach the final image.
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# What `pip install .` needs: the project metadata (its readme is README.md) and the package,
# with its package data (app/templates/*.j2, app/safety_rules/*.yaml).
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-cache-dir --upgrade pip && pip install --no-cache-dir .

# Final stage: slim, non-root, only the virtualenv with the service installed.
FROM python:3.11-slim
# WORKERS > 1 runs that many worker processes; set PROMETHEUS_MULTIPROC_DIR with it (compose
# uses /tmp/cx-relay-metrics, created below for the non-root user) so /metrics adds them up.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    WORKERS=1 \
    DATA_DIR=/var/lib/cx-relay
RUN useradd --system --uid 10001 --home-dir /var/lib/cx-relay --create-home cxrelay \
    && install -d -o cxrelay -g cxrelay -m 0700 /tmp/cx-relay-metrics
COPY --from=build /opt/venv /opt/venv
USER cxrelay
WORKDIR /var/lib/cx-relay
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"8080\")}/health/live', timeout=2)"
CMD ["python", "-m", "app", "serve"]
