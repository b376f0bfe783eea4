#!/usr/bin/env bash
# Runs Prometheus' promtool with the given arguments (`make lint`: check rules), installing it
# first where it is missing: Debian's `prometheus` package ships it (as root, through apt-get).
# Anywhere else it stops with how to install it, never skipping the check.
set -euo pipefail
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "promtool is missing: installing Debian's prometheus package (it ships promtool)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends prometheus >&2 \
      || { apt-get update >&2 && apt-get install -y --no-install-recommends prometheus >&2; }
  else
    echo "promtool is missing. Install it: 'sudo apt-get install prometheus' (Debian/Ubuntu)," >&2
    echo "'brew install prometheus' (macOS), or put promtool from a Prometheus release on PATH." >&2
    exit 1
  fi
fi
exec promtool "$@"
