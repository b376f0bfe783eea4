"""`python -m app keys create|list|rotate|revoke`: the /admin/keys steps offline, against the
store the settings name (DATA_DIR's SQLite file, or REDIS_URL with STORE_BACKEND=redis), audited
with the actor `cli:<user>`. A running service picks the change up within
CLIENT_KEYS_REFRESH_SECONDS: it reads the same store.

Only argparse is imported with this module (app.__main__ builds its parser for every command,
`serve` too, which loads the token encoding before the app's modules: app.worker says why); the
store and the service are imported when the command runs."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from contextlib import AsyncExitStack
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.core.settings import Settings
    from app.keys.service import ClientKeyService, IssuedKey, KeyView


def load_key_settings() -> Settings:
    """The service's settings (its environment and .env), of which this command reads only the
    store's and CLIENT_API_KEYS: what only serving needs (a provider, a webhook credential) is
    not asked for. ConfigError as load_settings."""
    from pydantic import model_validator

    from app.core.settings import Settings
    from app.core.settings_loading import load_settings_as

    class KeySettings(Settings):
        # each replaces the service's check of the same name: what serving needs, not this
        @model_validator(mode="after")
        def _coherent(self) -> KeySettings:
            if self.store_backend == "redis" and not self.redis_url:
                raise ValueError("STORE_BACKEND=redis needs REDIS_URL (e.g. redis://redis:6379/0)")
            return self

        @model_validator(mode="after")
        def _embedding_models_apart(self) -> KeySettings:
            return self

        @model_validator(mode="after")
        def _shared_session_id_key(self) -> KeySettings:
            return self

        @model_validator(mode="after")
        def _shared_access_token_key(self) -> KeySettings:
            return self

    return load_settings_as(KeySettings)


def add_keys_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser(
        "keys", help="create, list, rotate or revoke client keys in the configured store"
    )
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new client key (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", help="a label unique among the keys created at run time")
    create.add_argument(
        "--scopes",
        help="scopes separated by '+' or spaces (e.g. llm.gateway:invoke); "
        "leave out for a key allowed everywhere a client key is",
    )
    create.add_argument("--session-tokens", type=int, help="the key's own per-session budget")
    actions.add_parser("list", help="every key: CLIENT_API_KEYS' and those created at run time")
    for name, what in (("rotate", "a new key for the same id (printed once)"), ("revoke", "")):
        action = actions.add_parser(name, help=what or "delete a key created at run time")
        action.add_argument("key_id", help="the key's id, as `keys list` shows it")
    for action in actions.choices.values():
        action.add_argument("--json", action="store_true", help="print JSON")


async def run_keys(settings: Settings, args: argparse.Namespace) -> int:
    """0 done; 1 refused (unknown id, a key from the environment, a name taken, bad input);
    3 the store could not be reached."""
    from app.core.scopes import scope_names
    from app.keys.service import KeyConflict, KeyNotFound, KeyRequestInvalid
    from app.store import StoreUnavailable

    actor = f"cli:{getpass.getuser()}"
    try:
        async with AsyncExitStack() as stack:
            service = await _service(settings, stack)
            if args.action == "create":
                scopes = scope_names(args.scopes) if args.scopes is not None else None
                issued = await service.create(
                    tenant=args.tenant,
                    name=args.name,
                    scopes=scopes,
                    session_tokens=args.session_tokens,
                    actor=actor,
                )
                _print_issued(issued, args.json)
            elif args.action == "rotate":
                _print_issued(await service.rotate(args.key_id, actor=actor), args.json)
            elif args.action == "revoke":
                view = await service.revoke(args.key_id, actor=actor)
                _print_views([view], args.json, "revoked: ")
            else:
                _print_views(await service.list(), args.json)
    except (KeyRequestInvalid, KeyNotFound, KeyConflict) as error:
        print(f"cx-relay keys: {error}", file=sys.stderr)
        return 1
    except StoreUnavailable as error:
        print(f"cx-relay keys: the store could not be reached: {error}", file=sys.stderr)
        return 3
    return 0


async def _service(settings: Settings, stack: AsyncExitStack) -> ClientKeyService:
    from app.auth.clients import ClientAuthenticator
    from app.bootstrap.parts import open_client_key_registry
    from app.keys.service import ClientKeyService
    from app.store import open_store
    from app.store.audit import AuditLog

    store = await open_store(
        settings.store_backend,
        data_dir=settings.data_dir,
        redis_url=settings.redis_url,
        redis_prefix=settings.redis_key_prefix,
    )
    stack.push_async_callback(store.close)
    registry = await open_client_key_registry(settings, store, stack)
    audit = await AuditLog.open(settings.data_dir)
    stack.push_async_callback(audit.close)
    environment = ClientAuthenticator(
        [k.get_secret_value() for k in settings.client_api_keys], None
    )
    return ClientKeyService(
        registry, audit, environment.environment_keys, environment.session_tokens_by_key
    )


def _print_issued(issued: IssuedKey, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"key": issued.key, **asdict(issued.view)}))
        return
    print(issued.key)
    print(
        f"id {issued.view.id}, tenant {issued.view.tenant}: store the key now, it is not shown "
        "again",
        file=sys.stderr,
    )


def _print_views(views: list[KeyView], as_json: bool, lead: str = "") -> None:
    if as_json:
        print(json.dumps([asdict(view) for view in views]))
        return
    for v in views:
        scopes = "+".join(v.scopes) if v.scopes is not None else "(any)"
        budget = v.session_tokens if v.session_tokens is not None else "(tenant's)"
        print(
            f"{lead}{v.id}  {v.source:<11}  {v.tenant}  {v.masked or '-'}  name={v.name or '-'}  "
            f"scopes={scopes}  session_tokens={budget}  created={v.created_at or '-'}  "
            f"last_used={v.last_used_at or '-'}"
        )
