"""Embeddings through cx-relay with the official `openai` client, unchanged.

    make run                                  # in one terminal: the simulated service
    .venv/bin/python examples/embeddings.py   # in another

A question and three FAQ entries are embedded in one request (`dimensions` shortens the vectors)
and the entries ranked by their cosine similarity to the question. The request names a session
(`user`), so it counts against that session's budget and shows in
`GET /budget/sessions/example-faq`. Against `make run` the vectors come from the simulated
provider: deterministic but not semantic, so the ranking means something only against a real
model; point CX_RELAY_BASE_URL and CX_RELAY_KEY at your deployment (and CX_RELAY_EMBEDDING_MODEL
at one of its embedding models) for that.
"""

from __future__ import annotations

import math
import os

from openai import OpenAI

BASE_URL = os.environ.get("CX_RELAY_BASE_URL", "http://127.0.0.1:8080/v1")
KEY = os.environ.get("CX_RELAY_KEY", "cx-relay-dev-key")  # make run's development client key
MODEL = os.environ.get("CX_RELAY_EMBEDDING_MODEL", "text-embedding-3-small")

FAQ = [
    "How do I reset my password?",
    "Where is my order and when will it arrive?",
    "How do I cancel my subscription?",
]
QUESTION = "I forgot my login details"


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def main() -> None:
    client = OpenAI(base_url=BASE_URL, api_key=KEY)
    # The client asks for base64 (compact on the wire) and hands back floats.
    answer = client.embeddings.create(
        model=MODEL, input=[QUESTION, *FAQ], dimensions=256, user="example-faq"
    )
    question, *entries = (item.embedding for item in answer.data)
    print(f"{len(answer.data)} vectors of {len(question)} dimensions from {answer.model}")
    pairs = zip(FAQ, entries, strict=True)
    ranked = sorted(pairs, key=lambda pair: cosine(question, pair[1]), reverse=True)
    for text, vector in ranked:
        print(f"  {cosine(question, vector):+.3f}  {text}")
    cost = (answer.model_extra or {}).get("cx_relay", {}).get("cost", 0.0)
    print(f"usage: {answer.usage.prompt_tokens} tokens, cost ${cost:.8f}")


if __name__ == "__main__":
    main()
