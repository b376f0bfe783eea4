"""Embeddings through cx-relay with the official OpenAI Python client, unmodified.

    make run                                  # one terminal: the service, simulated
    .venv/bin/python examples/embeddings.py   # another: embed a question and three FAQ entries

The client is pointed at cx-relay's `/v1` with a client key (by default the development key that
`make run` accepts) and asks for the model `text-embedding-3-small` (LLM_EMBEDDING_MODELS, or a
provider file model with `kind: embedding`). It sends a session id as `user`, so the call counts
against that session's budget and shows in `GET /budget/sessions/example-faq`. Against `make run`
the vectors come from the simulated provider: deterministic but not semantic, so the ranking
printed means something only against a real provider.
"""

from __future__ import annotations

import argparse
import math
import os

from openai import OpenAI

FAQ = [
    "How do I reset my password?",
    "Where is my order and when will it arrive?",
    "How do I cancel my subscription?",
]
QUESTION = "I forgot my login details"


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8080/v1")
    )
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "cx-relay-dev-key"))
    parser.add_argument("--model", default="text-embedding-3-small")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    # The client asks for base64 (compact) and hands back floats; `dimensions` shortens them.
    answer = client.embeddings.create(
        model=args.model, input=[QUESTION, *FAQ], dimensions=256, user="example-faq"
    )
    question, *entries = (item.embedding for item in answer.data)
    ranked = sorted(zip(FAQ, entries), key=lambda pair: cosine(question, pair[1]), reverse=True)
    print(f"{len(answer.data)} vectors of {len(question)} dimensions from {answer.model}")
    for text, vector in ranked:
        print(f"  {cosine(question, vector):+.3f}  {text}")
    extras = (answer.model_extra or {}).get("cx_relay", {})
    print(f"usage: {answer.usage.prompt_tokens} tokens, cost ${extras.get('cost', 0):.8f}")


if __name__ == "__main__":
    main()
