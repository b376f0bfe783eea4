"""The provider file: key directives, validation with paths, and start-up from PROVIDERS_FILE."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.bootstrap.options import base_config, provider_config_from_env
from app.core.errors import ConfigError
from app.core.settings import Settings
from app.llm.catalog import (
    ModelSpec,
    ProviderConfigInvalid,
    canonical_json,
    load_provider_file,
    resolve_key,
    validate_provider_config,
)
from app.main import create_app
from tests.helpers import post_turn, trigger

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_ENV = {"OPENAI_KEY_1": "sk-1", "OPENAI_KEY_2": "sk-2", "ANTHROPIC_KEY": "sk-ant"}


def good(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load((ROOT / "examples/providers.yaml").read_text())
    raw.update(changes)
    return raw


def paths(raw: object, env: dict[str, str] | None = None) -> list[str]:
    return [p.path for p in validate_provider_config(raw, EXAMPLE_ENV if env is None else env)[1]]


# --- key directives ------------------------------------------------------------------------------


def test_env_directive_reads_the_variable() -> None:
    assert resolve_key("env:OPENAI_KEY_1", allow_literal=False, env=EXAMPLE_ENV) == "sk-1"


def test_file_directive_reads_and_strips_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("sk-from-file\n")
    assert resolve_key(f"file:{secret}", allow_literal=False, env={}) == "sk-from-file"


@pytest.mark.parametrize(
    ("directive", "reason"),
    [
        ("env:", "malformed"),
        ("env:NOT SET", "malformed"),
        ("env:MISSING_VAR", "not set"),
        ("file:relative/path", "absolute"),
        ("file:/nonexistent/cx-relay-key", "cannot be read"),
        ("sk-live-pasted", "bare key"),
        ("vault:secret/x", "malformed"),
        ("literal:sk-x", "not allowed"),
    ],
)
def test_bad_directives_say_why(directive: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        resolve_key(directive, allow_literal=False, env={})


def test_literal_keys_only_when_explicitly_allowed() -> None:
    assert resolve_key("literal:sk-dev", allow_literal=True, env={}) == "sk-dev"
    raw = good(allow_literal_keys=True)
    raw["providers"][0]["api_keys"] = ["literal:sk-dev"]
    assert paths(raw) == []


# --- validation ----------------------------------------------------------------------------------


def test_the_readme_example_is_valid() -> None:
    config, problems = validate_provider_config(good(), EXAMPLE_ENV)
    assert problems == []
    assert config is not None and [r.name for r in config.routes] == ["assistant"]


def test_every_seeded_mistake_is_reported_with_its_path() -> None:
    raw = yaml.safe_load((ROOT / "examples/providers.broken.yaml").read_text())
    problems = validate_provider_config(raw, {})[1]
    found = {(p.path, next(w for w in p.message.split() if w)) for p in problems}
    assert [p.path for p in problems] == [
        "providers",
        "providers[0].rpm",
        "providers[0].api_keys[0]",
        "providers[0].api_keys[1]",
        "providers[0].api_keys[2]",
        "routes[0].max_tokens",
        "routes[0].context_tokens",
        "routes[0].chain[1].provider",
        "routes[0].chain[2].model",
    ], found
    text = "\n".join(str(p) for p in problems)
    for expected in (
        "duplicate provider name 'openai'",
        "CX_RELAY_UNSET_VARIABLE is not set",
        "unknown provider 'azure'",
        "no model 'gpt-5-turbo'",
        "context window",
    ):
        assert expected in text


def test_shape_errors_and_semantic_errors_are_reported_together() -> None:
    raw = good()
    raw["providers"][0]["timeout_seconds"] = "fast"  # a shape error in one provider ...
    raw["providers"][1]["rpm"] = -5  # ... does not hide a semantic one in another
    found = paths(raw)
    assert "providers[0].timeout_seconds" in found
    assert "providers[1].rpm" in found
    assert not any("chain" in p for p in found)  # routes to the malformed one are not "unknown"


def test_duplicate_routes_and_models_are_reported() -> None:
    raw = good()
    raw["routes"].append(dict(raw["routes"][0]))
    raw["providers"][0]["models"].append(dict(raw["providers"][0]["models"][0]))
    found = paths(raw)
    assert "routes" in found and "providers[0].models" in found


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda r: r["providers"][0].update(base_url="api.openai.com"), "providers[0].base_url"),
        (lambda r: r["providers"][0].update(timeout_seconds=0), "providers[0].timeout_seconds"),
        (lambda r: r["routes"][0].update(chain=[]), "routes[0].chain"),
        (lambda r: r["routes"][0].update(temperature=3), "routes[0].temperature"),
        (
            lambda r: r["providers"][0]["models"][0].update(max_tokens=10**6),
            "providers[0].models[0].max_tokens",
        ),
        (lambda r: r["providers"][0].update(kind="cohere"), "providers[0].kind"),
        (lambda r: r["providers"][0].update(colour="blue"), "providers[0].colour"),
    ],
)
def test_single_mistakes_are_found(change: Any, path: str) -> None:
    raw = good()
    change(raw)
    assert path in paths(raw)


# --- embedding models ----------------------------------------------------------------------------


def embedding(**fields: Any) -> dict[str, Any]:
    return {"name": "text-embedding-3-large", "kind": "embedding", **fields}


def test_an_embedding_model_takes_8192_tokens_per_input_unless_told() -> None:
    config, problems = validate_provider_config(good(), EXAMPLE_ENV)
    assert problems == [] and config is not None
    model = config.providers[0].models[1]
    assert (model.name, model.kind, model.max_context_tokens) == (
        "text-embedding-3-small",
        "embedding",
        8192,
    )
    raw = good()
    raw["providers"][0]["models"][1]["max_context_tokens"] = 512
    config, _ = validate_provider_config(raw, EXAMPLE_ENV)
    assert config is not None and config.providers[0].models[1].max_context_tokens == 512
    assert config.providers[0].models[0].kind == "chat"


@pytest.mark.parametrize(
    ("change", "path", "says"),
    [
        (
            lambda r: r["providers"][1]["models"].append(embedding()),
            "providers[1].models[1].kind",
            "the anthropic kind has no embeddings endpoint",
        ),
        (
            lambda r: r["providers"][0]["models"].append(embedding(price_per_1k_completion=0.1)),
            "providers[0].models[2].price_per_1k_completion",
            "price_per_1k_prompt",
        ),
        (
            lambda r: r["providers"][0]["models"].append(embedding(max_tokens=512)),
            "providers[0].models[2].max_tokens",
            "longest input",
        ),
        (
            lambda r: r["providers"][0]["models"].append(embedding(structured_outputs=True)),
            "providers[0].models[2].structured_outputs",
            "answers no text",
        ),
        (
            lambda r: r["providers"][0]["models"].append(embedding(vision=True)),
            "providers[0].models[2].vision",
            "/v1/embeddings takes text",
        ),
        (
            lambda r: r["routes"][0]["chain"].insert(
                1, {"provider": "openai", "model": "text-embedding-3-small"}
            ),
            "routes[0].chain[1].model",
            "openai/text-embedding-3-small is an embedding model but openai/gpt-4o-mini is a "
            "chat model: a route serves one kind",
        ),
        (
            lambda r: r["routes"].append(
                {
                    "name": "search",
                    "temperature": 0.5,
                    "chain": [{"provider": "openai", "model": "text-embedding-3-small"}],
                }
            ),
            "routes[1].temperature",
            "a route of embedding models answers no text",
        ),
    ],
)
def test_embedding_model_mistakes_are_found(change: Any, path: str, says: str) -> None:
    raw = good()
    change(raw)
    problems = validate_provider_config(raw, EXAMPLE_ENV)[1]
    assert [p.path for p in problems] == [path], problems
    assert says in problems[0].message


def test_a_route_of_embedding_models_validates() -> None:
    chain = [{"provider": "openai", "model": "text-embedding-3-small"}]
    raw = good()
    raw["routes"].append({"name": "search", "context_tokens": 4096, "chain": chain})
    assert paths(raw) == []


def test_canonical_json_is_stable_across_key_order() -> None:
    config, _ = validate_provider_config(good(), EXAMPLE_ENV)
    assert config is not None
    shuffled = dict(reversed(list(config.model_dump(mode="json").items())))
    assert canonical_json(config) == canonical_json(shuffled)


def test_load_provider_file_reports_yaml_syntax_errors_with_the_line(tmp_path: Path) -> None:
    broken = tmp_path / "providers.yaml"
    broken.write_text("providers:\n  - name: a\n    base_url: [unclosed\n")
    with pytest.raises(ProviderConfigInvalid, match="line"):
        load_provider_file(broken, {})


# --- start-up ------------------------------------------------------------------------------------


def _settings(**values: Any) -> Settings:
    return Settings(_env_file=None, cognigy_webhook_secret="s", **values)  # type: ignore[arg-type]


def test_env_settings_become_one_provider_with_a_key_pool() -> None:
    settings = _settings(llm_gateway_base_url="http://127.0.0.1:1", llm_gateway_api_key="k1, k2,k3")
    config = provider_config_from_env(settings)
    assert len(config.providers) == 1
    assert config.providers[0].api_keys == ["literal:k1", "literal:k2", "literal:k3"]
    assert config.route(settings.llm_model) is not None


def test_env_settings_serve_the_embedding_models_at_their_price() -> None:
    settings = _settings(
        llm_gateway_base_url="http://127.0.0.1:1",
        llm_embedding_models="text-embedding-3-small, text-embedding-3-large",
        llm_embedding_price_per_1k_input="0.00013",
    )
    models = provider_config_from_env(settings).providers[0].models
    assert [(m.name, m.kind, m.price_per_1k_prompt) for m in models] == [
        ("gpt-4o-mini", "chat", 0.0),
        ("text-embedding-3-small", "embedding", 0.00013),
        ("text-embedding-3-large", "embedding", 0.00013),
    ]
    none = _settings(llm_gateway_base_url="http://127.0.0.1:1", llm_embedding_models="")
    assert [m.kind for m in provider_config_from_env(none).providers[0].models] == ["chat"]


def test_a_model_prices_prompt_and_completion_tokens_per_thousand() -> None:
    """The one cost formula: the ledger's cost and a call's reservation both come from it."""
    model = ModelSpec(name="priced", price_per_1k_prompt=1.5, price_per_1k_completion=2.0)
    assert model.price(2000, 500) == 4.0
    assert model.price(1000) == 1.5  # an embeddings call has input tokens only
    assert model.price(1, 1) == 0.0035
    assert ModelSpec(name="free").price(10_000, 10_000) == 0.0
    tiny = ModelSpec(name="tiny", price_per_1k_prompt=0.0000001)
    assert tiny.price(1) == 0.0  # rounded to 8 decimals, as the ledger records it


def test_llm_model_cannot_be_an_embedding_model() -> None:
    with pytest.raises(ValueError, match="LLM_EMBEDDING_MODELS names LLM_MODEL"):
        _settings(llm_gateway_base_url="http://127.0.0.1:1", llm_model="text-embedding-3-small")


def test_invalid_providers_file_stops_start_up_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text((ROOT / "examples/providers.broken.yaml").read_text())
    with pytest.raises(ConfigError) as caught:
        base_config(_settings(providers_file=str(path))).load()
    assert "PROVIDERS_FILE" in str(caught.value)
    assert "unknown provider 'azure'" in str(caught.value)


def test_llm_model_must_be_a_route_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "providers.yaml"
    path.write_text((ROOT / "examples/providers.yaml").read_text())
    with pytest.raises(ConfigError, match="LLM_MODEL 'gpt-9'"):
        base_config(_settings(providers_file=str(path), llm_model="gpt-9")).load()
    assert base_config(
        _settings(providers_file=str(path), llm_model="assistant")
    ).load().route("assistant")
    with pytest.raises(ConfigError, match="LLM_MODEL 'text-embedding-3-small' is an embedding"):
        base_config(
            _settings(providers_file=str(path), llm_model="text-embedding-3-small")
        ).load()


async def test_webhook_runs_on_a_providers_file_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_settings: Any, llm_server: Any
) -> None:
    monkeypatch.setenv("FILE_KEY", "sk-from-env")
    raw = {
        "providers": [
            {
                "name": "dead",
                "base_url": "http://127.0.0.1:9",
                "api_keys": ["env:FILE_KEY"],
                "models": [{"name": "m1"}],
            },
            {
                "name": "sim",
                "base_url": llm_server.url,
                "api_keys": ["env:FILE_KEY"],
                "models": [{"name": "m2"}],
            },
        ],
        "routes": [
            {
                "name": "assistant",
                "chain": [{"provider": "dead", "model": "m1"}, {"provider": "sim", "model": "m2"}],
            }
        ],
    }
    path = tmp_path / "providers.json"
    path.write_text(canonical_json(raw))
    app = create_app(make_settings(providers_file=path, llm_model="assistant"))
    import httpx

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = (await post_turn(client, trigger())).json()
    assert body["status"] == "success"
    assert (body["provider"], body["model"]) == ("sim", "m2-simulated")
    assert [(a["provider"], a["outcome"]) for a in body["attempts"]] == [
        ("dead", "unavailable"),
        ("sim", "ok"),
    ]


# --- the check-config command --------------------------------------------------------------------


def _check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
    )


@pytest.mark.slow
def test_check_config_prints_ok_for_the_readme_example() -> None:
    result = _check(ROOT / "examples/providers.yaml", EXAMPLE_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok")


@pytest.mark.slow
def test_check_config_lists_every_problem_and_fails() -> None:
    result = _check(ROOT / "examples/providers.broken.yaml", {})
    assert result.returncode == 1
    assert "9 problem(s)" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.startswith("  ")]) == 9
    assert "routes[0].chain[1].provider: unknown provider 'azure'" in result.stdout


@pytest.mark.slow
def test_check_config_on_a_missing_file_fails_clearly(tmp_path: Path) -> None:
    result = _check(tmp_path / "nope.yaml", {})
    assert result.returncode == 1
    assert "cannot be read" in result.stdout
