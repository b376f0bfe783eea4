"""Continuing a streamed answer that broke after part of it went to the caller.

A second answer glued onto half of the first would read as nonsense, so the route's next entry
is asked to go on from where the text stops: the text so far becomes the assistant's own turn.
Anthropic continues a last assistant turn by itself (a prefill); an OpenAI-compatible model is
asked to, with an instruction after it. `Answered` keeps, across a request's attempts, what was
passed on (the prefix) and what each broken stream had produced (its provider bills it).
"""

from __future__ import annotations

from app.core.errors import StreamBroken
from app.llm.messages import Message
from app.llm.routes import Target
from app.llm.streaming import OnDelta
from app.llm.types import BrokenPart, ChatRequest

# Asked of the route's next entry when a stream broke after part of the answer went out.
CONTINUE_INSTRUCTION = (
    "Your previous reply was cut off where the text above ends. Continue it from exactly that "
    "point: do not repeat any of it, do not start over, and do not mention the interruption."
)


def continuation(messages: list[Message], so_far: str, kind: str) -> list[Message]:
    """The conversation for the entry that continues a broken answer: the text so far is the
    assistant's own. Anthropic continues a last assistant turn by itself (a prefill, which may
    not end in whitespace); an OpenAI-compatible model is asked to go on."""
    if kind == "anthropic":
        return [*messages, {"role": "assistant", "content": so_far.rstrip()}]
    return [
        *messages,
        {"role": "assistant", "content": so_far},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]


class Answered:
    """What a streamed request has passed on to its caller, across the attempts that wrote it:
    the text (the prefix a continuation goes on from) and the parts of broken streams."""

    def __init__(self, on_delta: OnDelta) -> None:
        self._on_delta = on_delta
        self.text: list[str] = []
        self.broken: list[BrokenPart] = []
        self.asking: ChatRequest | None = None  # the request of the attempt under way
        self._trim = False  # the text so far ends in whitespace: a continuation's first is cut

    async def forward(self, delta: str) -> None:
        if self._trim:
            delta = delta.lstrip()
            if not delta:
                return
            self._trim = False
        self.text.append(delta)
        await self._on_delta(delta)

    def joined(self) -> str:
        return "".join(self.text)

    def broke(self, error: StreamBroken, target: Target) -> None:
        """The attempt under way broke after passing on `error.partial`: its provider bills
        the prompt it was sent and that text."""
        prompt = self.asking.messages if self.asking is not None else []
        self.broken.append(
            BrokenPart(target.provider.spec.name, target.model.name, prompt, error.partial)
        )
        self._trim = self.joined()[-1:].isspace()
