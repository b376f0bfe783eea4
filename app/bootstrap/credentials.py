"""The service's own secrets and accepted credentials, from Settings: the key that signs CXone's
botSessionState, the key of session-id digests, the CXone Authorization values; and the warnings
about development values left in place."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Any, get_args

from pydantic import SecretStr

from app.auth.signatures import AuthorizationAuthenticator
from app.auth.tokens import AccessTokens, OAuthClient
from app.core.credentials import parse_oauth_client, split_tenant
from app.core.settings import (
    DEV_BOT_STATE_SECRET,
    DEV_CLIENT_API_KEY,
    DEV_CXONE_AUTHORIZATION,
    MIN_ADMIN_TOKEN_CHARS,
    Settings,
)
from app.llm.directives import DirectivePolicy, secret_digest

log = logging.getLogger("cxrelay")

# not SecretStr, but a URL that may carry a password (redis://:password@host)
_SECRET_URLS = ("redis_url",)


def directive_policy(settings: Settings) -> DirectivePolicy:
    """What a configuration sent through the API may name as a key: PROVISIONING_ENV_PREFIX,
    PROVISIONING_SECRETS_DIR, and never a secret this service holds, named or copied: every
    SecretStr setting (by its variable names and its values, each credential entry also without
    its `:tenant` and in its long parts)."""
    names: set[str] = {name.upper() for name in _SECRET_URLS}
    digests: set[str] = set()
    for name, info in Settings.model_fields.items():
        if not _holds_secret(info.annotation):
            continue
        names.add(name.upper())
        for alias in (info.alias, info.validation_alias):
            if isinstance(alias, str):
                names.add(alias.upper())
            for choice in getattr(alias, "choices", ()):
                if isinstance(choice, str):
                    names.add(choice.upper())
        value = getattr(settings, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, SecretStr) and (secret := item.get_secret_value().strip()):
                digests |= {secret_digest(part) for part in _secret_parts(secret)}
    return DirectivePolicy(
        env_prefix=settings.provisioning_env_prefix,
        secrets_dir=settings.provisioning_secrets_dir,
        reserved_names=frozenset(names),
        reserved_digests=frozenset(digests),
    )


def _secret_parts(entry: str) -> set[str]:
    """An entry as a whole, its credential without `:tenant`, and each long `:`-separated part
    (an OAUTH_CLIENTS entry's secret sits between its id and its tenant)."""
    head = entry.split(";", 1)[0]  # no `;scopes=...`
    long_parts = {p.strip() for p in head.split(":") if len(p.strip()) >= _MIN_PART_CHARS}
    return {entry, head, split_tenant(head)[0], *long_parts}


_MIN_PART_CHARS = 12  # shorter pieces (a tenant, a client id) are no one's secret


def _holds_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return any(_holds_secret(arg) for arg in get_args(annotation))


def state_secret(settings: Settings) -> bytes:
    if settings.bot_state_secret is not None:
        return settings.bot_state_secret.get_secret_value().encode()
    log.warning(
        "BOT_STATE_SECRET is not set: botSessionState is signed with a key of this process "
        "only, so another replica (or a restart) starts CXone conversations afresh"
    )
    return secrets.token_bytes(32)


SESSION_ID_KEY_LABEL = b"cx-relay session id digests"


def session_id_key(settings: Settings) -> bytes:
    """SESSION_ID_SECRET; else a key derived from BOT_STATE_SECRET (a shared secret already, and
    never the same key as the state signature's; simulated mode has a development one); else
    one of this process only (settings refuse that with several workers or replicas)."""
    if settings.session_id_secret is not None:
        return settings.session_id_secret.get_secret_value().encode()
    if settings.bot_state_secret is not None:
        secret = settings.bot_state_secret.get_secret_value().encode()
        return hmac.new(secret, SESSION_ID_KEY_LABEL, hashlib.sha256).digest()
    log.warning(
        "SESSION_ID_SECRET is not set (nor BOT_STATE_SECRET): session ids holding personal data "
        "are digested with a key of this process only, so after a restart such a session starts "
        "afresh (its budget too) and its earlier records are found only by the digest shown"
    )
    return secrets.token_bytes(32)


ACCESS_TOKEN_KEY_LABEL = b"cx-relay access tokens"


def access_tokens(settings: Settings) -> AccessTokens:
    """The OAuth clients and the key their tokens are signed with: ACCESS_TOKEN_SECRET; else
    one derived from BOT_STATE_SECRET (shared already; never the same key as its other uses);
    else one of this process only (settings refuse that with several workers or replicas)."""
    clients = [
        OAuthClient.from_entry(parse_oauth_client(c.get_secret_value()))
        for c in settings.oauth_clients
    ]
    if settings.access_token_secret is not None:
        key = settings.access_token_secret.get_secret_value().encode()
    elif settings.bot_state_secret is not None:
        secret = settings.bot_state_secret.get_secret_value().encode()
        key = hmac.new(secret, ACCESS_TOKEN_KEY_LABEL, hashlib.sha256).digest()
    else:
        if clients:
            log.warning(
                "ACCESS_TOKEN_SECRET is not set (nor BOT_STATE_SECRET): access tokens are "
                "signed with a key of this process only, so a restart ends every token issued"
            )
        key = secrets.token_bytes(32)
    return AccessTokens(clients, key, settings.access_token_ttl_seconds)


def cxone_authorizations(settings: Settings) -> AuthorizationAuthenticator:
    """The accepted Authorization values (`value:tenant`, as every credential setting), held as
    SHA-256 digests: no raw credential kept around."""
    return AuthorizationAuthenticator(
        [split_tenant(v.get_secret_value().strip()) for v in settings.cxone_webhook_authorization]
    )


def warn_about_development_settings(settings: Settings) -> None:
    admin = settings.admin_token
    if admin is not None and len(admin.get_secret_value()) < MIN_ADMIN_TOKEN_CHARS:
        log.warning(
            "ADMIN_TOKEN is %d characters: a short token can be guessed (wrong tokens are "
            "throttled per address, ADMIN_MAX_FAILURES_PER_ADDRESS, not per token); use at least "
            "%d random characters, e.g. `openssl rand -hex 32`",
            len(admin.get_secret_value()),
            MIN_ADMIN_TOKEN_CHARS,
        )
    if settings.allow_unauthenticated_webhooks:
        log.warning(
            "ALLOW_UNAUTHENTICATED_WEBHOOKS=true: webhook requests WITHOUT a credential are "
            "accepted. Development only; never run like this in front of customers."
        )
    if any(
        v.get_secret_value() == DEV_CXONE_AUTHORIZATION
        for v in settings.cxone_webhook_authorization
    ):
        log.warning(
            "development CXone Authorization value %r accepted (simulated mode's, or compose's "
            "default); set your own CXONE_WEBHOOK_AUTHORIZATION before exposing this service",
            DEV_CXONE_AUTHORIZATION,
        )
    secret = settings.bot_state_secret
    if secret is not None and secret.get_secret_value() == DEV_BOT_STATE_SECRET:
        log.warning(
            "development BOT_STATE_SECRET in use (simulated mode's, or compose's default): "
            "anyone can forge CXone conversation state; set your own before exposing this "
            "service"
        )
    if any(k.get_secret_value() == DEV_CLIENT_API_KEY for k in settings.client_api_keys):
        log.warning(
            "development client API key %r accepted for the chat and /budget routes (simulated "
            "mode's, or compose's default); set your own CLIENT_API_KEYS before exposing this "
            "service",
            DEV_CLIENT_API_KEY,
        )
    if settings.using_dev_secret:
        log.warning(
            "development webhook secret %r in use (simulated mode's, or compose's default); set "
            "your own COGNIGY_WEBHOOK_SECRET before exposing this service",
            "cx-relay-dev-secret",
        )
