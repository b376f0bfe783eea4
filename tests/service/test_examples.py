"""The runnable examples in examples/, run as a reader would run them: against the service as
`make run` starts it (`python -m app serve --simulate`), with the official `openai` client."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from app.core.settings import DEV_CLIENT_API_KEY
from tests.helpers import REPO_ROOT, ServiceProcess, running_service, service_env


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    with running_service(tmp_path_factory.mktemp("examples"), "--simulate") as service:
        yield service


def run_example(name: str, service: ServiceProcess) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / name)],
        env=service_env(CX_RELAY_BASE_URL=f"{service.url}/v1"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_the_tool_calling_example_completes_both_loops(simulated: ServiceProcess) -> None:
    out = run_example("tool_calling.py", simulated)
    lines = out.splitlines()
    assert lines[0].startswith("step 1: tool_calls [ChatCompletionMessageFunctionToolCall(")
    assert "get_order_status" in lines[0]
    assert lines[1].startswith('step 2: (simulated) The tool answered: {"order_number": "')
    assert '"status": "shipped"' in lines[1]
    assert lines[2].startswith("streamed step 1: [") and "usage: CompletionUsage(" in lines[2]
    assert lines[3].startswith("(simulated) The tool answered:")


def test_examples_are_listed_in_the_readme() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    for example in sorted(Path(REPO_ROOT / "examples").glob("*.py")):
        assert f"examples/{example.name}" in readme, example.name


@pytest.mark.slow
def test_make_run_answers_an_image_part_and_a_strict_json_schema(
    simulated: ServiceProcess,
) -> None:
    """What Cognigy's AI Agent nodes and agent frameworks send, against `make run` as it is."""
    client = OpenAI(base_url=f"{simulated.url}/v1", api_key=DEV_CLIENT_API_KEY, max_retries=0)
    pixel = (
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
        "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )
    seen = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": pixel}},
                ],
            }
        ],
    )
    assert "(and 1 attachment)" in (seen.choices[0].message.content or "")
    schema = {
        "type": "object",
        "properties": {"intent": {"type": "string"}, "urgent": {"type": "boolean"}},
        "required": ["intent", "urgent"],
        "additionalProperties": False,
    }
    structured = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "My card was charged twice!"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "triage", "schema": schema, "strict": True},
        },
    )
    answer = json.loads(structured.choices[0].message.content or "")
    assert set(answer) == {"intent", "urgent"} and isinstance(answer["urgent"], bool)


def readme_embeddings_sample() -> str:
    """docs/chat.md's /v1/embeddings Python sample, as it is written there."""
    readme = (REPO_ROOT / "docs" / "chat.md").read_text(encoding="utf-8")
    section = readme.split("\n### OpenAI-compatible embeddings: `/v1/embeddings`\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_embeddings_example_and_readme_sample_are_answered_and_metered(
    simulated: ServiceProcess,
) -> None:
    """`make run` as it is answers the official client's embeddings (the client's default
    base64, decoded by it), and the calls are in the session's budget and the ledger."""
    out = run_example("embeddings.py", simulated).splitlines()
    assert out[0] == "4 vectors of 256 dimensions from text-embedding-3-small-simulated"
    assert sorted(line.split("  ", 2)[2] for line in out[1:4]) == [
        "How do I cancel my subscription?",
        "How do I reset my password?",
        "Where is my order and when will it arrive?",
    ]
    assert out[4].startswith("usage: ") and "cost $0.00000" in out[4]
    sample = readme_embeddings_sample()
    assert "http://127.0.0.1:8080/v1" in sample
    readme = subprocess.run(
        [sys.executable, "-c", sample.replace("http://127.0.0.1:8080", simulated.url)],
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert readme.returncode == 0, readme.stderr
    assert readme.stdout.startswith("2 256 ")
    key = {"Authorization": f"Bearer {DEV_CLIENT_API_KEY}"}
    session = httpx.get(f"{simulated.url}/budget/sessions/example-faq", headers=key).json()
    records = httpx.get(f"{simulated.url}/budget/usage", headers=key).json()["records"]
    assert session["calls"] == 1 and session["prompt_tokens"] > 0 and session["cost"] > 0
    assert [r["session"] for r in records if r["surface"] == "embeddings"] == [
        "kb-sync-1",
        "example-faq",
    ]
