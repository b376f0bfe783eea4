"""Inbound webhook authentication: HMAC body signatures, Standard Webhooks, API keys, HTTP Basic
and OAuth2 access tokens.

Cognigy's HTTP Request node cannot sign a body by itself, so every authorization type it offers
is accepted too: an API key (`X-API-Key` or `Authorization: ApiKey`), Basic Auth, and OAuth2
client credentials (a bearer token from this service's own token endpoint); a gateway or Cognigy
Extension in front can sign with either HMAC scheme. Several secrets may be
active at once so one can be rotated without downtime. Every comparison is constant-time.

Each secret and key may belong to a tenant (given as a `(value, tenant)` pair; the settings'
`value:tenant` is read by app.core.credentials.split_tenant): the tenant of the credential that
verified becomes the Principal's, so budgets, the ledger and the cache count webhook turns per
tenant. A bare string is the default tenant's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.core.errors import AuthenticationFailed
from app.core.principal import DEFAULT_TENANT, Principal

HMAC_HEADER = "x-webhook-signature"
API_KEY_HEADER = "x-api-key"
SW_ID, SW_TIMESTAMP, SW_SIGNATURE = "webhook-id", "webhook-timestamp", "webhook-signature"

if TYPE_CHECKING:
    from app.auth.tokens import AccessTokens

# A credential as configured: its value alone (the default tenant's), or (value, tenant).
Credential = str | tuple[str, str]


def fingerprint(secret: str) -> str:
    """A short, stable id for a credential that is safe to log."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


class ReplayGuard:
    """Remembers recently accepted webhook ids so a captured request cannot be sent again.

    Ids are kept for twice the timestamp tolerance: an older replay already fails the timestamp
    check. Bounded, so a flood of ids cannot grow memory without limit (the oldest go first).
    This guard is per process; replicas behind a load balancer share it once the Redis store lands.
    """

    def __init__(self, ttl_seconds: float, max_entries: int = 100_000) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_time(self, message_id: str, now: float | None = None) -> bool:
        """True, and remembered, if this id was not seen within the TTL."""
        now = time.monotonic() if now is None else now
        while self._seen:  # entries are in arrival order: expired ones are at the front
            oldest_id, seen_at = next(iter(self._seen.items()))
            if now - seen_at < self._ttl:
                break
            del self._seen[oldest_id]
        if message_id in self._seen:
            return False
        if len(self._seen) >= self._max:
            self._seen.popitem(last=False)  # make room only for an id that is really new
        self._seen[message_id] = now
        return True


@dataclass(frozen=True)
class _Secret:
    value: bytes  # the HMAC key, or an API key's SHA-256 digest
    key_id: str
    tenant: str


def _with_tenant(credential: Credential) -> tuple[str, str]:
    return (credential, DEFAULT_TENANT) if isinstance(credential, str) else credential


def _standard_webhooks_key(secret: str) -> bytes:
    """Standard Webhooks secrets are `whsec_<base64>`; anything else is used as raw bytes."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode()


class WebhookAuthenticator:
    """Turns a request's headers and raw body into a Principal, or raises AuthenticationFailed."""

    def __init__(
        self,
        *,
        secrets: Sequence[Credential],
        api_keys: Sequence[Credential],
        schemes: Iterable[str],
        tolerance_seconds: int,
        replay_guard: ReplayGuard,
        allow_unauthenticated: bool = False,
        tenant: str = DEFAULT_TENANT,
        basic: Sequence[tuple[str, str, str]] = (),
        tokens: AccessTokens | None = None,
    ) -> None:
        pairs = [_with_tenant(s) for s in secrets]
        self._hmac_secrets = [_Secret(s.encode(), fingerprint(s), t) for s, t in pairs]
        self._sw_secrets = [_Secret(_standard_webhooks_key(s), fingerprint(s), t) for s, t in pairs]
        self._api_key_digests = _digests(api_keys)
        # (username, password, tenant): the digest of the whole `username:password`
        self._basic_digests = _digests([(f"{u}:{p}", t) for u, p, t in basic])
        self._tokens = tokens if tokens is not None and tokens.configured else None
        self._schemes = set(schemes)
        self._tolerance = tolerance_seconds
        self._replays = replay_guard
        self._allow_unauthenticated = allow_unauthenticated
        self._tenant = tenant  # of an unauthenticated request (ALLOW_UNAUTHENTICATED_WEBHOOKS)

    @property
    def enabled(self) -> bool:
        """Whether any request can pass (the start-up summary says so): off, every request is
        refused as `disabled`."""
        return bool(
            self._hmac_secrets
            or self._api_key_digests
            or self._basic_digests
            or self._tokens is not None
            or self._allow_unauthenticated
        )

    @property
    def accepted_schemes(self) -> list[str]:
        """The COGNIGY_AUTH_SCHEMES a request can pass with now (a credential configured for
        each), in the order they are tried; names only, never a credential."""
        if not self.enabled:
            return []
        held = {
            "standard_webhooks": bool(self._sw_secrets),
            "hmac": bool(self._hmac_secrets),
            "api_key": bool(self._api_key_digests),
            "basic": bool(self._basic_digests),
            "oauth2": self._tokens is not None,
        }
        return [scheme for scheme, ok in held.items() if ok and scheme in self._schemes]

    def authenticate(self, headers: Mapping[str, str], body: bytes) -> Principal:
        if not self.enabled:
            # only the CXone webhook is configured (the CXone tutorial's .env has no Cognigy part)
            raise AuthenticationFailed(
                "the Cognigy webhook is disabled until one of COGNIGY_WEBHOOK_SECRET, "
                "COGNIGY_API_KEYS, COGNIGY_BASIC_AUTH or OAUTH_CLIENTS is set",
                "disabled",
            )
        if SW_SIGNATURE in headers and "standard_webhooks" in self._schemes:
            return self._standard_webhooks(headers, body)
        if HMAC_HEADER in headers and "hmac" in self._schemes:
            return self._hmac(headers[HMAC_HEADER], body)
        presented_key = _api_key_from(headers)
        if presented_key is not None and "api_key" in self._schemes:
            return self._api_key(presented_key)
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic" and "basic" in self._schemes and self._basic_digests:
            return self._basic(value.strip())
        bearer = scheme.lower() == "bearer" and value.strip()
        if bearer and "oauth2" in self._schemes and self._tokens is not None:
            principal = self._tokens.verify(value.strip())
            return Principal(
                principal.tenant, principal.key_id, "webhook", "oauth2", principal.scopes
            )
        if self._allow_unauthenticated:
            return Principal(self._tenant, "unauthenticated", "anonymous", "none")
        raise AuthenticationFailed(
            "missing webhook credential: send X-Webhook-Signature (HMAC-SHA256 of the body), "
            "the Standard Webhooks headers, X-API-Key, Authorization: ApiKey, Basic or "
            "Bearer <access token>",
            "missing",
        )

    @staticmethod
    def _principal(secret: _Secret, scheme: str) -> Principal:
        return Principal(secret.tenant, secret.key_id, "webhook", scheme)

    def _hmac(self, header: str, body: bytes) -> Principal:
        presented = header.strip().removeprefix("sha256=").lower()
        match = None
        for secret in self._hmac_secrets:
            expected = hmac.new(secret.value, body, hashlib.sha256).hexdigest()
            if hmac.compare_digest(expected.encode(), presented.encode()):
                match = secret
        if match is None:
            raise AuthenticationFailed("invalid X-Webhook-Signature for this body")
        return self._principal(match, "hmac")

    def _standard_webhooks(self, headers: Mapping[str, str], body: bytes) -> Principal:
        message_id = headers.get(SW_ID, "")
        timestamp = headers.get(SW_TIMESTAMP, "")
        if not message_id or not timestamp:
            raise AuthenticationFailed(
                "webhook-signature needs webhook-id and webhook-timestamp", "malformed"
            )
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise AuthenticationFailed(
                "webhook-timestamp must be whole seconds since the epoch", "malformed"
            ) from None
        if abs(time.time() - sent_at) > self._tolerance:
            raise AuthenticationFailed(
                f"webhook-timestamp is more than {self._tolerance}s away from this server's clock",
                "expired",
            )
        signed = f"{message_id}.{timestamp}.".encode() + body
        presented = [
            part.split(",", 1)[1].encode()
            for part in headers[SW_SIGNATURE].split()
            if part.startswith("v1,")
        ]
        match = None
        for secret in self._sw_secrets:
            expected = base64.b64encode(hmac.new(secret.value, signed, hashlib.sha256).digest())
            for candidate in presented:
                if hmac.compare_digest(expected, candidate):
                    match = secret
        if match is None:
            raise AuthenticationFailed("invalid webhook-signature for this id, timestamp and body")
        if not self._replays.first_time(message_id):
            raise AuthenticationFailed(
                f"webhook-id {message_id!r} was already delivered (replay)", "replayed"
            )
        return self._principal(match, "standard_webhooks")

    def _basic(self, encoded: str) -> Principal:
        """RFC 7617: base64 of `username:password`, compared whole as a digest."""
        try:
            pair = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, ValueError):
            raise AuthenticationFailed(
                "Authorization: Basic is not base64 of username:password", "malformed"
            ) from None
        match = _digest_match(self._basic_digests, pair)
        if match is None:
            raise AuthenticationFailed("unknown username or wrong password")
        return self._principal(match, "basic")

    def _api_key(self, presented: str) -> Principal:
        match = _digest_match(self._api_key_digests, presented)
        if match is None:
            raise AuthenticationFailed("unknown API key")
        return self._principal(match, "api_key")


def _digests(values: Sequence[Credential]) -> list[_Secret]:
    return [
        _Secret(hashlib.sha256(v.encode()).digest(), fingerprint(v), t)
        for v, t in map(_with_tenant, values)
    ]


def _digest_match(accepted: Sequence[_Secret], presented: str) -> _Secret | None:
    """Compared as SHA-256 digests (neither content nor length leaks through timing), with no
    early exit (nor does which one matched)."""
    digest = hashlib.sha256(presented.encode()).digest()
    match = None
    for expected in accepted:
        if hmac.compare_digest(expected.value, digest):
            match = expected
    return match


class AuthorizationAuthenticator:
    """CXone's custom exchange endpoint sends a fixed Authorization header: the whole value is
    compared with each CXONE_WEBHOOK_AUTHORIZATION entry, and the matching entry's tenant is the
    Principal's."""

    def __init__(self, values: Sequence[Credential]) -> None:
        self._accepted = _digests([(v.strip(), t) for v, t in map(_with_tenant, values)])

    @property
    def configured(self) -> bool:
        return bool(self._accepted)

    def authenticate(self, presented: str) -> Principal:
        if not presented.strip():
            raise AuthenticationFailed("missing Authorization header", "missing")
        match = _digest_match(self._accepted, presented.strip())
        if match is None:
            raise AuthenticationFailed("Authorization header not accepted for this endpoint")
        return Principal(match.tenant, match.key_id, "webhook", "authorization")


def _api_key_from(headers: Mapping[str, str]) -> str | None:
    if API_KEY_HEADER in headers:
        return headers[API_KEY_HEADER].strip()
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "apikey" and value.strip():
        return value.strip()
    return None


def sign_hmac(secret: str, body: bytes) -> str:
    """The X-Webhook-Signature value for a body (used by the tests, the README and the bench)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def sign_standard_webhook(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature value a Standard Webhooks sender would send."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_standard_webhooks_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()
