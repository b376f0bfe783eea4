# syntax=docker/dockerfile:1
# The base image is pinned to a Python patch release and a Debian release (bumped deliberately,
# like a locked dependency); the same tag for both stages, since the virtualenv built in the first
# points at the second's /usr/local/bin/python3.11.

# Build stage: install uv.lock into /opt/venv; nothing else of this stage reaches the final image.
FROM python:3.11.14-slim-bookworm AS build
# uv: the same release as the Makefile's UV_VERSION and the dev extra's pin (tests/service checks).
# uv puts the virtualenv at /opt/venv, uses the image's Python (never downloads one), copies files
# instead of linking them from its cache, and compiles bytecode once here.
ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /src
# 1. The dependencies, from the lock alone (every version and hash fixed; --locked fails when the
#    lock does not match pyproject.toml): this layer is rebuilt only when one of these two changes.
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-dev --no-install-project --no-editable
# 2. The service itself: a code change rebuilds from here on, without reinstalling anything above.
#    What the project build needs: its metadata's readme and license, and the package with its
#    package data (app/templates/*.j2, app/safety_rules/*.yaml).
COPY README.md LICENSE ./
COPY app ./app
RUN uv sync --locked --no-dev --no-editable

# Final stage: slim, non-root, only the virtualenv with the service installed.
FROM python:3.11.14-slim-bookworm
# WORKERS > 1 runs that many worker processes; set PROMETHEUS_MULTIPROC_DIR with it (compose
# uses /tmp/cx-relay-metrics, created below for the service's user) so /metrics adds them up.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    WORKERS=1 \
    DATA_DIR=/var/lib/cx-relay
# The service's user and group, 10001 both (compose's tmpfs is mounted for that uid and gid).
RUN groupadd --system --gid 10001 cxrelay \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cx-relay --create-home cxrelay \
    && install -d -o 10001 -g 10001 -m 0700 /tmp/cx-relay-metrics
COPY --from=build /opt/venv /opt/venv
# numeric, so a runtime that refuses root (Kubernetes' runAsNonRoot) can tell without /etc/passwd
USER 10001:10001
WORKDIR /var/lib/cx-relay
EXPOSE 8080
# exec form: no shell in between; Python reads PORT from the environment itself
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"8080\")}/health/live', timeout=2)"]
CMD ["python", "-m", "app", "serve"]
