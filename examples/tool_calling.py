"""A two-step tool-calling loop through cx-relay with the official `openai` client, unchanged.

    make run                                  # in one terminal: the simulated service
    .venv/bin/python examples/tool_calling.py # in another

The model is offered one tool; it asks for it (a `tool_calls` answer), this script runs the tool
and sends its result back, and the model answers from it. Once with whole answers, once streamed
with the client's own stream helper (which puts the streamed tool call back together). Against
`make run` the simulated model plays its part; point CX_RELAY_BASE_URL and CX_RELAY_KEY at your
deployment to run it against a real model.
"""

from __future__ import annotations

import json
import os
from typing import Any

from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

BASE_URL = os.environ.get("CX_RELAY_BASE_URL", "http://127.0.0.1:8080/v1")
KEY = os.environ.get("CX_RELAY_KEY", "cx-relay-dev-key")  # make run's development client key
MODEL = os.environ.get("CX_RELAY_MODEL", "gpt-4o-mini")

TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_order_status",
            "description": "Where an order is, by its number.",
            "parameters": {
                "type": "object",
                "properties": {"order_number": {"type": "string"}},
                "required": ["order_number"],
            },
        },
    }
]


def get_order_status(order_number: str = "") -> dict[str, Any]:
    """The tool itself: here a stand-in for the order system."""
    return {"order_number": order_number, "status": "shipped", "eta": "tomorrow"}


def run_tools(message: Any) -> list[ChatCompletionMessageParam]:
    """The assistant's turn and one tool message per call it made."""
    turns: list[ChatCompletionMessageParam] = [message.model_dump(exclude_none=True)]
    for call in message.tool_calls or []:
        result = get_order_status(**json.loads(call.function.arguments or "{}"))
        turns.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    return turns


def plain(client: OpenAI) -> str:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Where is my order 123456?"}
    ]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    print("step 1:", first.choices[0].finish_reason, first.choices[0].message.tool_calls)
    messages += run_tools(first.choices[0].message)
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    print("step 2:", second.choices[0].message.content)
    return second.choices[0].message.content or ""


def streamed(client: OpenAI) -> str:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Has order 987654 left yet?"}
    ]
    options: dict[str, Any] = {"stream_options": {"include_usage": True}}
    with client.chat.completions.stream(
        model=MODEL, messages=messages, tools=TOOLS, **options
    ) as stream:
        first = stream.get_final_completion()
    print("streamed step 1:", first.choices[0].message.tool_calls, "usage:", first.usage)
    messages += run_tools(first.choices[0].message)
    with client.chat.completions.stream(
        model=MODEL, messages=messages, tools=TOOLS, **options
    ) as stream:
        for event in stream:
            if event.type == "content.delta":
                print(event.delta, end="", flush=True)
        second = stream.get_final_completion()
    print()
    return second.choices[0].message.content or ""


if __name__ == "__main__":
    openai_client = OpenAI(base_url=BASE_URL, api_key=KEY)
    plain(openai_client)
    streamed(openai_client)
