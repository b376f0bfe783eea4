"""Command line.

python -m app serve [--simulate] [--host H] [--port P]   the service (WORKERS processes)
python -m app simulator [--host H] [--port P]            the simulated LLM provider and CXone
python -m app check-config FILE                          validate a provider file
python -m app config-docs [--check]                      docs/configuration.md and .env.example
python -m app keys create|list|rotate|revoke ...          client keys, in the configured store
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import uvicorn

from app.bootstrap.keys_cli import add_keys_command
from app.core.errors import ConfigError
from app.core.settings_loading import load_settings
from app.observability.logs import configure_logging
from app.worker import load_tokenizer_first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="cx-relay")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument(
        "--simulate",
        action="store_true",
        help="serve unconfigured upstreams (LLM provider, CXone) from the embedded simulators",
    )
    serve.add_argument("--host", help="bind address (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: PORT or 8080)")
    simulator = commands.add_parser(
        "simulator",
        help="serve only the simulated upstreams (LLM provider + CXone), e.g. for compose",
    )
    simulator.add_argument("--host", default="127.0.0.1")
    simulator.add_argument("--port", type=int, default=9000)
    check = commands.add_parser(
        "check-config", help="validate a provider file; prints every problem, exits 1 if any"
    )
    check.add_argument("file", type=Path)
    docs = commands.add_parser(
        "config-docs",
        help="write docs/configuration.md and .env.example from Settings (make docs)",
    )
    docs.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if either file is stale"
    )
    docs.add_argument(
        "--root", type=Path, default=Path.cwd(), help="the repository (default: the current one)"
    )
    add_keys_command(commands)
    args = parser.parse_args(argv)
    if args.command == "config-docs":
        return config_docs(args.root, check=args.check)
    if args.command == "simulator":
        return run_simulator(args.host, args.port)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "keys":
        return manage_keys(args)

    overrides: dict[str, object] = {}
    if args.simulate:
        overrides["simulate"] = True
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    try:
        settings = load_settings(**overrides)
    except ConfigError as error:
        print(f"cx-relay: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    load_tokenizer_first(settings)
    from app.serving import serve as run_service  # after the encoding (app.worker says why)

    return run_service(settings, overrides)


def config_docs(root: Path, *, check: bool) -> int:
    """The settings reference and `.env.example`, rendered from Settings (one source)."""
    from app.core.settings import Settings
    from app.core.settings_reference import stale_files, write_files

    if not check:
        for path in write_files(Settings, root):
            print(f"wrote {path.relative_to(root)}")
        return 0
    stale = stale_files(Settings, root)
    for path in stale:
        print(
            f"{path.relative_to(root)} is stale: it no longer matches the settings in "
            "app/core/settings.py; run `make docs` and commit the result",
            file=sys.stderr,
        )
    return 1 if stale else 0


def check_config(path: Path) -> int:
    """Every problem of the file at once, each with its path in the file; "ok" when none."""
    from app.llm.catalog import ProviderConfigInvalid, load_provider_file

    try:
        config = load_provider_file(path)
    except ProviderConfigInvalid as error:
        print(f"{path}: {len(error.problems)} problem(s)")
        for problem in error.problems:
            print(f"  {problem}")
        return 1
    routes = ", ".join(r.name for r in config.routes) or "none"
    print(f"ok: {len(config.providers)} provider(s), routes: {routes}")
    return 0


def manage_keys(args: argparse.Namespace) -> int:
    from app.bootstrap.keys_cli import load_key_settings, run_keys

    try:
        settings = load_key_settings()
    except ConfigError as error:
        print(f"cx-relay: {error}", file=sys.stderr)
        return 2
    return asyncio.run(run_keys(settings, args))


def run_simulator(host: str, port: int) -> int:
    from app.simulator.combined import create_combined_simulator

    configure_logging("INFO")
    uvicorn.run(create_combined_simulator(), host=host, port=port, log_config=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
