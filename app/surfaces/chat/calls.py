"""The chat surface's call and answer, shared by POST /chat and /ws/chat: a ChatBody made into
the pipeline's ChatCall, and the outcome made into the reply (or a stream's last frame)."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException

from app.core.principal import Principal
from app.pipelines.chat_call import ChatCall, ChatOutcome
from app.prompts.caller_templates import CallerTemplates
from app.safety.session_ids import SessionIds
from app.surfaces.chat.schemas import ChatBody, ChatReply


def build_call(
    body: ChatBody,
    principal: Principal,
    templates: CallerTemplates,
    session_ids: SessionIds,
    surface: str = "chat",
) -> ChatCall:
    messages = [m.model_dump() for m in body.messages]
    if body.template is not None:
        try:
            text = templates.render(body.template, body.variables)
        except ValueError as error:
            raise HTTPException(422, str(error)) from None
        messages.append({"role": "user", "content": text})
    rf = body.response_format
    return ChatCall(
        principal=principal,
        session_id=session_ids.stored(body.session_id),  # a digest when it is PII
        messages=messages,
        surface=surface,
        model=body.model,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        fallback_models=body.fallback_models,
        safety_filters=body.safety_filters,
        output_schema=body.output_schema,
        json_object=rf is not None and rf.type == "json_object",
    )


def reply(call: ChatCall, outcome: ChatOutcome) -> ChatReply:
    return ChatReply(
        session_id=call.session_id,
        response=outcome.content,
        prompt_tokens=outcome.usage.prompt_tokens,
        completion_tokens=outcome.usage.completion_tokens,
        finish_reason=outcome.finish_reason,
        model_used=outcome.model_used,
        **outcome.report(),
    )


def complete_frame(call: ChatCall, outcome: ChatOutcome) -> dict[str, Any]:
    """The last frame of a streamed answer (SSE and /ws/chat)."""
    frame = reply(call, outcome).model_dump()
    frame.pop("response")
    return {
        "type": "complete",
        "usage": outcome.usage.as_dict(),
        "model": outcome.model,
        "cost": outcome.cost,
        **frame,
    }
