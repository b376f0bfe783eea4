"""The session id a caller sends, turned once at the edge into the one that is stored and shown.

Callers choose their session ids, and some choose personal data: an e-mail address as the OpenAI
`user`, a card number as `X-Session-Id`. Kept as sent, it would reach the turn logs, the ledger
and /budget verbatim. So an id in which any PII rule finds a value (app/safety_rules/pii.yaml,
the rules the replies are redacted with) is replaced by a keyed digest, `pii-` and the first 32
hex digits of HMAC-SHA256(key, id), wherever a caller's id enters: /chat, /v1, /ws/chat, the
Cognigy conversation id and the /budget reads. The digest is deterministic, so the same id is
the same session (and budget) on every call, and a caller still reads its session back by the id
it sent; the key keeps anyone who reads the ledger from confirming a guessed address or card
number by digesting it. Every process sharing a store must share the key (SESSION_ID_SECRET).

Any other id is kept as it is: its sessions, budgets and ledger rows stay where they were. A
digest holds no PII, so mapping it again leaves it unchanged: the id /budget shows works as a
session id too.
"""

from __future__ import annotations

import hashlib
import hmac

from app.safety.rules import SafetyRules
from app.store import NO_SESSION

DIGEST_PREFIX = "pii-"
DIGEST_HEX_DIGITS = 32  # 128 bits: no two ids of a tenant meet by chance


class SessionIds:
    """Maps a caller's session id to the stored one: a keyed digest when it holds personal data."""

    def __init__(self, rules: SafetyRules, key: bytes) -> None:
        if not key:
            raise ValueError("the session id key is empty")
        self._rules = rules
        self._key = key

    def stored(self, session_id: str) -> str:
        if session_id == NO_SESSION or not self._rules.contains_pii(session_id):
            return session_id
        digest = hmac.new(self._key, session_id.encode(), hashlib.sha256).hexdigest()
        return DIGEST_PREFIX + digest[:DIGEST_HEX_DIGITS]
