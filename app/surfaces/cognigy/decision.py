"""The structured routing decision the LLM must produce for the Cognigy fallback webhook."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RoutingDecision(BaseModel):
    """Strict: unknown keys, out-of-range confidence or a non-boolean flag are all rejected,
    so a Cognigy flow can branch on these fields without defensive checks."""

    model_config = ConfigDict(extra="forbid", strict=True)

    classified_intent: str = Field(min_length=1, max_length=128)
    confidence: float = Field(ge=0.0, le=1.0)
    extracted_parameters: dict[str, Any]
    suggested_response: str = Field(min_length=1, max_length=2000)
    requires_human_agent: bool
