"""What a chat call asks for and what it gave: shared by the chat pipeline and the three chat
routes that build calls and shape outcomes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from app.core.principal import Principal
from app.llm.messages import Message
from app.llm.types import OutputSchema, Usage
from app.safety.injection import InjectionMode

SafetyFilter = Literal["pii", "unsafe", "injection", "profanity", "self_harm"]
ALL_FILTERS: frozenset[str] = frozenset({"pii", "unsafe", "injection"})
# The tutorial's filter names that are one unsafe-output category each (app/safety_rules).
CATEGORY_FILTERS: tuple[str, ...] = ("self_harm", "profanity")
OnText = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class ChatOptions:
    default_model: str
    max_tokens: int
    temperature: float
    system_template: str
    lightweight_template: str
    deadline_seconds: float
    first_token_timeout: float
    injection_mode: InjectionMode
    unsafe_categories: tuple[str, ...]
    fallback_text: str


@dataclass
class ChatCall:
    """What a caller asks for, already authenticated and parsed."""

    principal: Principal
    session_id: str
    messages: list[Message]
    surface: str
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    fallback_models: list[str] = field(default_factory=list)
    safety_filters: Collection[str] | None = None  # None: every filter
    output_schema: OutputSchema | None = None  # the answer's JSON Schema, name and strictness
    json_object: bool = False
    tools: list[dict[str, Any]] | None = None  # OpenAI's tool definitions (/v1)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)  # stop, seed, top_p ... (CHAT_OPTIONS)
    # set by the pipeline once the input is checked, before any text: the prompt-injection
    # pattern names found, so a streaming surface can put them in its response headers
    injection: tuple[str, ...] = ()

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the answer is validated against, when the caller gave one."""
        return self.output_schema.schema if self.output_schema is not None else None

    def filters(self) -> Collection[str]:
        return ALL_FILTERS if self.safety_filters is None else self.safety_filters

    def unsafe_categories(self, configured: tuple[str, ...]) -> tuple[str, ...]:
        """The unsafe-output categories checked for this call: `unsafe` means every configured
        one; `profanity` and `self_harm` add their own category, configured or not."""
        filters = self.filters()
        chosen = list(configured) if "unsafe" in filters else []
        chosen += [name for name in CATEGORY_FILTERS if name in filters and name not in chosen]
        return tuple(chosen)


@dataclass
class ChatOutcome:
    content: str
    model: str
    provider: str
    usage: Usage = field(default_factory=Usage)
    cost: float = 0.0
    cached: bool = False
    lightweight: bool = False
    dropped: int = 0
    finish_reason: str = "stop"  # "content_filter" when the guard blocked the answer
    blocked: str | None = None
    injection: tuple[str, ...] = ()
    redactions: dict[str, int] = field(default_factory=dict)
    usage_estimated: bool = False
    parsed: dict[str, Any] | None = None  # the validated object, with a json_schema
    latency_ms: float = 0.0
    repaired: bool = False
    model_used: str = ""  # the configured model that answered (the provider may echo another)
    tool_calls: tuple[dict[str, Any], ...] = ()  # OpenAI's, after the guard checked arguments

    def report(self) -> OutcomeReport:
        """What the service did, under the names both chat wires give it (/chat's reply and
        /v1's `cx_relay` field), so the two cannot drift apart."""
        return OutcomeReport(
            cost=self.cost,
            cached=self.cached,
            lightweight_mode=self.lightweight,
            provider=self.provider,
            model=self.model,
            prompt_injection=list(self.injection),
            blocked=self.blocked,
            dropped_turns=self.dropped,
            usage_estimated=self.usage_estimated,
            latency_ms=self.latency_ms,
            output=self.parsed,
        )


class OutcomeReport(TypedDict):
    cost: float
    cached: bool
    lightweight_mode: bool
    provider: str
    model: str
    prompt_injection: list[str]
    blocked: str | None
    dropped_turns: int
    usage_estimated: bool
    latency_ms: float
    output: dict[str, Any] | None
