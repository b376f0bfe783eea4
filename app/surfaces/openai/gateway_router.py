"""POST /api/v1/llm/gateway/chat: the budgets tutorial's (001) gateway chat. Its payload
(`model`, `messages`, `temperature`, `max_tokens`) is an OpenAI chat completion request and the
answer it reads (`choices[0].message.content`, `usage.prompt_tokens` and `completion_tokens`) an
OpenAI chat completion, so this is /v1/chat/completions under the tutorial's path: the same
handler, pipeline (budgets, truncation, intent cache, injection sanitising), errors (429 with
Retry-After, 401, 403) and `cx_relay` extras (cost, cached, lightweight)."""

from __future__ import annotations

from fastapi import APIRouter

from app.http.openapi import json_request_body
from app.surfaces.openai.errors import ERRORS, OpenAIRoute
from app.surfaces.openai.router import STREAMED, chat_completions
from app.surfaces.openai.schemas import ChatCompletion, ChatCompletionRequest

router = APIRouter(prefix="/api/v1/llm/gateway", tags=["gateway"], route_class=OpenAIRoute)
router.post(
    "/chat",
    response_model=ChatCompletion,
    responses={**STREAMED, **ERRORS},
    openapi_extra=json_request_body(ChatCompletionRequest),
    summary="Gateway chat (tutorial 001): an OpenAI chat completion",
    operation_id="gateway_chat",
)(chat_completions)
