"""Wire formats of the Cognigy fallback webhook: the trigger Cognigy sends and what it gets back.

The trigger takes the integration tutorial's names (`conversationId`, `lastMessage`, ...) and the
names a Cognigy flow has at hand (`sessionId`, `text`, `intent`, `intentScore`), so a flow author
can pass `{{input.sessionId}}` and friends straight through.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from app.surfaces.cognigy.decision import RoutingDecision

ContextState = Literal["available", "unavailable", "not_configured"]
FallbackStatus = Literal[
    "schema_validation_failed",
    "llm_unavailable",
    "deadline_exceeded",
    "budget_exhausted",  # the session's or tenant's budget cannot take the call
    "budget_unavailable",  # the budget store cannot be asked: nothing is spent unmetered
    "rate_limited",  # over the key's or tenant's requests or tokens per minute
]


class CognigyTrigger(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", str_strip_whitespace=True)

    conversation_id: str = Field(
        validation_alias=AliasChoices("conversationId", "sessionId"), min_length=1, max_length=256
    )
    user_id: str | None = Field(None, validation_alias=AliasChoices("userId"), max_length=256)
    last_message: str = Field(
        validation_alias=AliasChoices("lastMessage", "text"), min_length=1, max_length=8000
    )
    confidence_score: float = Field(
        0.0, validation_alias=AliasChoices("confidenceScore", "intentScore"), ge=0.0, le=1.0
    )
    detected_intent: str | None = Field(
        None, validation_alias=AliasChoices("detectedIntent", "intent"), max_length=256
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("confidence_score", mode="before")
    @classmethod
    def _no_score_means_zero(cls, value: object) -> object:
        # Cognigy sends intentScore null when no intent matched at all: the lowest confidence.
        return 0.0 if value is None else value

    @field_validator("metadata", mode="before")
    @classmethod
    def _no_metadata(cls, value: object) -> object:
        return {} if value is None else value

    @property
    def cxone_contact_id(self) -> str:
        """The CXone contact to read history from: metadata may name it, else the conversation."""
        for key in ("cxoneContactId", "contactId"):
            value = self.metadata.get(key)
            if isinstance(value, (str, int)) and str(value):
                return str(value)
        return self.conversation_id


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CognigyResponse(BaseModel):
    """One shape for every answer, so a flow can always read `routing_decision` and branch on
    `status` / `fallback_action` without checking which fields exist."""

    status: Literal["success"] | FallbackStatus
    conversationId: str
    routing_decision: RoutingDecision
    fallback_action: Literal["route_to_human"] | None = None
    suggested_response: str | None = None
    reason: str | None = None
    # The Cognigy tutorial's name for `reason` on a fallback (its flows read `error`); null on
    # success, like `reason`.
    error: str | None = None
    context: ContextState
    provider: str | None = None
    model: str | None = None
    usage: UsageOut
    latency_ms: float
    request_id: str = ""
    attempts: list[dict[str, Any]] = []  # each provider/model tried, with its outcome
    cached: bool = False  # answered from the intent cache: no model call, usage 0
