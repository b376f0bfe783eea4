"""The intent cache as the webhooks use it: keyed on everything the model would be sent.

The chat surfaces key on the instruction and the conversation; a webhook turn's whole input is
its rendered messages (history included), so only an identical turn (same instruction, same
history, same words, same tenant and answering chain) is served from the cache, at no cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.cache.intent_cache import CachedAnswer, IntentCache
from app.core.errors import UnknownModel
from app.llm.messages import SYSTEM_ROLES, cache_text
from app.metering.context import CallContext


def conversation_parts(
    messages: Sequence[Mapping[str, Any]], qualifier: str = ""
) -> tuple[str, str]:
    """(instruction, input): every system message (and what else shapes the answer, such as a
    caller's output filters and schema), then the whole conversation after them."""
    system = "\n".join(cache_text(m) for m in messages if m["role"] in SYSTEM_ROLES)
    if qualifier:
        system += "\n" + qualifier
    turns = "\n".join(
        f"{m['role']}: {cache_text(m)}" for m in messages if m["role"] not in SYSTEM_ROLES
    )
    return system, turns


@dataclass(frozen=True)
class TurnCache:
    """The shared IntentCache, off when INTENT_CACHE_ENABLED is false. Entries are the call's
    tenant's, keyed on the answering chain of the call's own router (see CallContext)."""

    cache: IntentCache
    enabled: bool = True

    def _model(self, context: CallContext, route: str) -> str | None:
        if not self.enabled:
            return None
        try:
            return context.answerers(route)
        except UnknownModel:
            return None  # the call itself reports it

    def get(
        self,
        context: CallContext,
        route: str,
        messages: Sequence[Mapping[str, Any]],
        qualifier: str = "",
    ) -> CachedAnswer | None:
        model = self._model(context, route)
        if model is None:
            return None
        tenant = context.principal.tenant
        return self.cache.get(tenant, model, *conversation_parts(messages, qualifier))

    def put(
        self,
        context: CallContext,
        route: str,
        messages: Sequence[Mapping[str, Any]],
        answer: CachedAnswer,
        qualifier: str = "",
    ) -> None:
        """Callers put only answers that passed validation and the safety checks."""
        model = self._model(context, route)
        if model is not None:
            tenant = context.principal.tenant
            self.cache.put(tenant, model, *conversation_parts(messages, qualifier), answer)
