"""One call's view of shared state, read once at its pipeline's entry and passed down.

Applying a provider configuration (the admin API, app.llm.provisioning) swaps the router in
`RouterSlot`. A call that read the slot at each step could fit its prompt on one router, send it
through a second and price it at a third's prices. A `CallContext` holds the router the call
started with, and every later step (plan, cache key, provider call, settle, ledger record) asks
the context, so a swap takes effect from the next call on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.core.deadline import Deadline
from app.core.principal import Principal
from app.llm.attempts import Attempt
from app.llm.catalog import ModelKind
from app.llm.embeddings import EmbeddingRequest, EmbeddingResult
from app.llm.router import LLMRouter
from app.llm.routes import Route
from app.llm.streaming import OnDelta
from app.llm.types import ChatRequest, ChatResult, Usage


@dataclass(frozen=True)
class CallContext:
    """Who calls, for which session and surface, by when, and on which router (its routes and
    prices). Immutable: a route, once resolved on the router, is kept for the rest of the call
    (the router itself never changes, so that is the answer every later lookup would give)."""

    principal: Principal
    session_id: str
    surface: str
    deadline: Deadline
    router: LLMRouter
    _routes: dict[tuple[str, ModelKind], Route] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def route(self, name: str, kind: ModelKind = "chat") -> Route:
        """The route `name` of the call's router; UnknownModel when it has none of `kind`."""
        resolved = self._routes.get((name, kind))
        if resolved is None:
            resolved = self._routes[(name, kind)] = self.router.route(name, kind)
        return resolved

    def answerers(self, route_name: str) -> str:
        """The route with the (provider, model) chain behind it: the intent cache keys on this,
        so an answer from one provider configuration is not served once the chain changes."""
        route = self.route(route_name)
        chain = ",".join(f"{t.provider.spec.name}/{t.model.name}" for t in route.targets)
        return f"{route.name}={chain}"

    def price(self, provider: str, model: str, usage: Usage) -> float:
        """`usage` at the call's router's prices for (provider, model); 0 when unconfigured."""
        return self.router.price(provider, model, usage)

    def cost(self, trail: tuple[Attempt, ...], usage: Usage) -> float:
        """`usage` at the prices of the (provider, model) that answered (the trail's last)."""
        return self.router.cost(trail, usage)

    def check_request(self, request: ChatRequest) -> None:
        """RequestUnsupported when no model of the request's route can take it."""
        self.router.check_request(request, self.route(request.model))

    async def complete(
        self, request: ChatRequest, trail: list[Attempt] | None = None
    ) -> ChatResult:
        """The whole answer, within the call's deadline (see LLMRouter.complete)."""
        route = self.route(request.model)
        return await self.router.complete(request, self.deadline, trail, route=route)

    async def complete_streamed(
        self,
        request: ChatRequest,
        first_token_timeout: float,
        on_delta: OnDelta | None = None,
    ) -> ChatResult:
        """The answer streamed, within the call's deadline (see LLMRouter.complete_streamed)."""
        return await self.router.complete_streamed(
            request,
            self.deadline,
            first_token_timeout,
            on_delta,
            route=self.route(request.model),
        )

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """Embeddings, within the call's deadline (see LLMRouter.embed)."""
        route = self.route(request.model, "embedding")
        return await self.router.embed(request, self.deadline, route=route)
