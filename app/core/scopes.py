"""Scopes: what a scoped client key or an issued access token may do.

A credential without a scope list (`Principal.scopes is None`) is allowed everywhere a client
key is; one with a list reaches a scope-guarded route only when the list holds (one of) the
scope(s) the route asks for. The names are the integration tutorials' (001: `llm.gateway:*`;
000: `llm-inference:*`, `llm-gateway:manage`; 002: `gateway:write` and its reads), so a client
configured from a tutorial asks for the scopes it already knows. Here in core because the
settings validate scope lists at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

INVOKE = "llm.gateway:invoke"  # 001: the gateway chat
METRICS_READ = "llm.gateway:metrics:read"  # 001: the metrics and budget reads
INFERENCE_EXECUTE = "llm-inference:execute"  # 000: inference over HTTP and the WebSocket
INFERENCE_READ = "llm-inference:read"  # 000: reads (health, models)
GATEWAY_MANAGE = "llm-gateway:manage"  # 000: registering providers
GATEWAY_WRITE = "gateway:write"  # 002: creating gateways and their health checks
MODEL_READ = "model:read"  # 002
PROVIDER_READ = "provider:read"  # 002
AUDIT_WRITE = "audit:write"  # 002

KNOWN_SCOPES: frozenset[str] = frozenset(
    {
        INVOKE,
        METRICS_READ,
        INFERENCE_EXECUTE,
        INFERENCE_READ,
        GATEWAY_MANAGE,
        GATEWAY_WRITE,
        MODEL_READ,
        PROVIDER_READ,
        AUDIT_WRITE,
    }
)

# Either one lets a scoped credential call a model (/chat, /v1/*, /ws/chat, the gateway chat):
# both tutorials name one for the same thing.
INVOKE_SCOPES: tuple[str, ...] = (INVOKE, INFERENCE_EXECUTE)
# Either one lets a scoped credential read usage and cost (/budget/*, the gateway metrics).
READ_USAGE_SCOPES: tuple[str, ...] = (METRICS_READ,)

# In CLIENT_API_KEYS, after the key (and its tenant and tokens): `;scopes=` then the scopes,
# separated by spaces (OAuth's own form, RFC 6749 3.3) or by `+` (no quoting needed).
SCOPES_MARKER = ";scopes="
_SEPARATORS = re.compile(r"[ +]+")


def scope_names(text: str) -> list[str]:
    """Scopes separated by spaces or `+`, in their order."""
    return [s for s in _SEPARATORS.split(text.strip()) if s]


def unknown_scopes(names: Iterable[str], where: str = "scope") -> str | None:
    """The message naming the names that are no scope (and the known ones), or None."""
    unknown = sorted(set(names) - KNOWN_SCOPES)
    if not unknown:
        return None
    return f"unknown {where} {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_SCOPES))})"


def parse_scope_list(text: str, where: str = "scope") -> frozenset[str]:
    """Scopes separated by spaces or `+` -> the set; ValueError naming an unknown one (a typo
    would otherwise leave a key that is refused everywhere, found out only by its users)."""
    scopes = frozenset(scope_names(text))
    if problem := unknown_scopes(scopes, where):
        raise ValueError(problem)
    return scopes


def split_scopes(entry: str, setting: str = "CLIENT_API_KEYS") -> tuple[str, frozenset[str] | None]:
    """`<credential>;scopes=a b` -> (credential, {a, b}); without the marker, (entry, None): a
    key without a scope list. The split is at the LAST marker. ValueError on an empty or unknown
    scope list."""
    head, sep, listed = entry.rpartition(SCOPES_MARKER)
    if not sep:
        return entry, None
    scopes = parse_scope_list(listed, f"scope in {setting}")
    if not scopes or not head:
        raise ValueError(
            f"a {setting} entry has `;scopes=` without a credential before it or a scope after "
            "it: write e.g. `key:tenant;scopes=llm.gateway:invoke+llm.gateway:metrics:read`, or "
            "(CLIENT_API_KEYS) leave `;scopes=` out for a key allowed everywhere"
        )
    return head, scopes


def missing_scope(
    held: frozenset[str] | None, any_of: tuple[str, ...], *, explicit: bool = False
) -> str | None:
    """None when a credential holding `held` may pass a guard asking for any of `any_of`, else
    the message naming what is missing. No scope list (None) passes every guard, unless the
    guard is `explicit`: a right a key must be given (provisioning), which a key without a list
    never had."""
    if not any_of or (held is not None and held.intersection(any_of)):
        return None
    if held is None and not explicit:
        return None
    wanted = " or ".join(any_of)
    if held is None:
        return (
            f"missing scope: {wanted} (this key has no scope list; this route needs the admin "
            "token or a credential whose scope list holds the scope)"
        )
    return f"missing scope: {wanted} (this credential holds: {' '.join(sorted(held)) or 'none'})"
