"""Settings from the environment and `.env`, and the small URL / Retry-After helpers."""

from __future__ import annotations

import email.utils
from pathlib import Path

import pytest
from pydantic import SecretStr

from app.core.errors import ConfigError
from app.core.settings import DEV_BOT_STATE_SECRET, DEV_WEBHOOK_SECRET
from app.core.settings_loading import load_settings
from app.llm.openai_provider import chat_completions_url
from app.llm.wire import parse_retry_after

BASE_URL = "https://llm.example.test/v1"


@pytest.fixture
def valid_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The minimum a real (non-simulated) deployment needs."""
    monkeypatch.setenv("LLM_GATEWAY_BASE_URL", BASE_URL)
    monkeypatch.setenv("COGNIGY_WEBHOOK_SECRET", "env-secret")
    return monkeypatch


def _config_error(**overrides: object) -> str:
    with pytest.raises(ConfigError) as failure:
        load_settings(**overrides)
    return str(failure.value)


def test_reads_unprefixed_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_GATEWAY_BASE_URL", "https://gateway.example.test/v1/")
    monkeypatch.setenv("LLM_MODEL", "llama-3.1-8b")
    monkeypatch.setenv("COGNIGY_WEBHOOK_SECRET", "a, b")
    monkeypatch.setenv("COGNIGY_API_KEYS", "key-one,key-two")
    monkeypatch.setenv("COGNIGY_AUTH_SCHEMES", "hmac,api_key")

    settings = load_settings()

    assert settings.llm_gateway_base_url == "https://gateway.example.test/v1"
    assert settings.llm_model == "llama-3.1-8b"
    assert all(isinstance(s, SecretStr) for s in settings.cognigy_webhook_secret)
    assert [s.get_secret_value() for s in settings.cognigy_webhook_secret] == ["a", "b"]
    assert [k.get_secret_value() for k in settings.cognigy_api_keys] == ["key-one", "key-two"]
    assert settings.cognigy_auth_schemes == ["hmac", "api_key"]
    assert settings.using_dev_secret is False


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LLM_TEMPERATURE", "5"),
        ("COGNIGY_CONFIDENCE_THRESHOLD", "1.5"),
        ("LLM_GATEWAY_BASE_URL", "ftp://x"),
        ("COGNIGY_AUTH_SCHEMES", "digest"),
        ("PORT", "abc"),
    ],
)
def test_invalid_value_names_the_environment_variable(
    valid_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    valid_env.setenv(variable, value)
    assert variable in _config_error()


def test_tutorial_names_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """An .env copied from the gateway and Cognigy tutorials works unchanged."""
    monkeypatch.setenv("LLM_GATEWAY_URL", "https://gateway.example.test/v1/")
    monkeypatch.setenv("COGNIGY_API_KEY", "tutorial-key")
    monkeypatch.setenv("COGNIGY_API_KEYS", "key-one")
    settings = load_settings()
    assert settings.llm_gateway_base_url == "https://gateway.example.test/v1"
    assert [k.get_secret_value() for k in settings.cognigy_api_keys] == ["key-one", "tutorial-key"]
    assert settings.llm_max_tokens == 1024


def test_an_alias_agreeing_with_its_canonical_name_is_fine(valid_env: pytest.MonkeyPatch) -> None:
    valid_env.setenv("LLM_GATEWAY_URL", BASE_URL)
    assert load_settings().llm_gateway_base_url == BASE_URL


def test_an_alias_conflict_stops_start_up_naming_both(valid_env: pytest.MonkeyPatch) -> None:
    valid_env.setenv("LLM_GATEWAY_URL", "https://other.example.test")
    message = _config_error()
    assert "LLM_GATEWAY_URL" in message and "LLM_GATEWAY_BASE_URL" in message
    assert "https://other.example.test" in message


def test_invalid_value_message_has_one_line_per_problem(valid_env: pytest.MonkeyPatch) -> None:
    valid_env.setenv("LLM_TEMPERATURE", "5")
    valid_env.setenv("PORT", "abc")
    message = _config_error()
    lines = [line.strip() for line in message.splitlines()]
    assert any(line.startswith("LLM_TEMPERATURE:") for line in lines)
    assert any(line.startswith("PORT:") for line in lines)


def test_missing_gateway_url_points_at_simulate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COGNIGY_WEBHOOK_SECRET", "env-secret")
    message = _config_error()
    assert "LLM_GATEWAY_BASE_URL" in message
    assert "--simulate" in message


def test_missing_gateway_url_is_fine_when_simulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COGNIGY_WEBHOOK_SECRET", "env-secret")
    settings = load_settings(simulate=True)
    assert settings.simulate is True
    assert settings.llm_gateway_base_url is None


def test_blank_gateway_url_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_GATEWAY_BASE_URL", "   ")
    monkeypatch.setenv("COGNIGY_WEBHOOK_SECRET", "env-secret")
    assert "--simulate" in _config_error()


def test_no_webhook_credential_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_GATEWAY_BASE_URL", BASE_URL)
    message = _config_error()
    assert "COGNIGY_WEBHOOK_SECRET" in message
    assert "ALLOW_UNAUTHENTICATED_WEBHOOKS" in message


def test_no_webhook_credential_allowed_when_explicitly_unauthenticated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_GATEWAY_BASE_URL", BASE_URL)
    monkeypatch.setenv("ALLOW_UNAUTHENTICATED_WEBHOOKS", "true")
    settings = load_settings()
    assert settings.allow_unauthenticated_webhooks is True
    assert settings.webhook_credentials_configured is False
    assert settings.using_dev_secret is False


def test_simulated_without_credentials_uses_the_dev_secret() -> None:
    settings = load_settings(simulate=True)
    assert settings.using_dev_secret is True
    assert [s.get_secret_value() for s in settings.cognigy_webhook_secret] == [DEV_WEBHOOK_SECRET]


def test_simulated_with_own_secret_does_not_use_the_dev_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COGNIGY_WEBHOOK_SECRET", "my-own-secret")
    settings = load_settings(simulate=True)
    assert settings.using_dev_secret is False
    assert [s.get_secret_value() for s in settings.cognigy_webhook_secret] == ["my-own-secret"]


def test_simulated_with_only_api_keys_does_not_add_the_dev_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COGNIGY_API_KEYS", "only-a-key")
    settings = load_settings(simulate=True)
    assert settings.using_dev_secret is False
    assert settings.cognigy_webhook_secret == []


def test_cxone_password_grant_needs_an_access_key(valid_env: pytest.MonkeyPatch) -> None:
    valid_env.setenv("CXONE_CLIENT_ID", "client-id")
    valid_env.setenv("CXONE_CLIENT_SECRET", "client-secret")
    valid_env.setenv("CXONE_GRANT_TYPE", "password")
    assert "CXONE_ACCESS_KEY_ID" in _config_error()


@pytest.mark.parametrize(
    ("access_key", "grant"), [("key-id", "password"), (None, "client_credentials")]
)
def test_cxone_grant_type_unset_follows_whether_an_access_key_is_given(
    valid_env: pytest.MonkeyPatch, access_key: str | None, grant: str
) -> None:
    """The tutorials' CXONE_CLIENT_ID/CXONE_CLIENT_SECRET alone ask for client credentials."""
    valid_env.setenv("CXONE_CLIENT_ID", "client-id")
    valid_env.setenv("CXONE_CLIENT_SECRET", "client-secret")
    if access_key is not None:
        valid_env.setenv("CXONE_ACCESS_KEY_ID", access_key)
        valid_env.setenv("CXONE_ACCESS_KEY_SECRET", "key-secret")
    assert load_settings().cxone_grant_type == grant


def test_a_cxone_credential_alone_starts_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_GATEWAY_BASE_URL", BASE_URL)
    monkeypatch.setenv("CXONE_WEBHOOK_AUTHORIZATION", "Bearer only-cxone")
    settings = load_settings()
    assert settings.webhook_credentials_configured is False
    assert settings.cxone_webhook_enabled is True


def test_cxone_client_id_without_client_secret_is_refused(valid_env: pytest.MonkeyPatch) -> None:
    valid_env.setenv("CXONE_CLIENT_ID", "client-id")
    valid_env.setenv("CXONE_GRANT_TYPE", "client_credentials")
    assert "CXONE_CLIENT_SECRET" in _config_error()


def test_dotenv_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "LLM_GATEWAY_BASE_URL=https://from-dotenv.example.test\n"
        "LLM_MODEL=dotenv-model\n"
        "COGNIGY_WEBHOOK_SECRET=dotenv-secret\n",
        encoding="utf-8",
    )
    settings = load_settings()
    assert settings.llm_gateway_base_url == "https://from-dotenv.example.test"
    assert settings.llm_model == "dotenv-model"
    assert [s.get_secret_value() for s in settings.cognigy_webhook_secret] == ["dotenv-secret"]


def test_environment_wins_over_dotenv(tmp_path: Path, valid_env: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("LLM_MODEL=dotenv-model\n", encoding="utf-8")
    valid_env.setenv("LLM_MODEL", "env-model")
    assert load_settings().llm_model == "env-model"


def test_secrets_never_appear_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {
        "LLM_GATEWAY_API_KEY": "sk-provider-SECRET-1",
        "COGNIGY_WEBHOOK_SECRET": "hmac-SECRET-2,hmac-SECRET-3",
        "COGNIGY_API_KEYS": "apikey-SECRET-4",
        "CXONE_CLIENT_SECRET": "cxone-client-SECRET-5",
        "CXONE_ACCESS_KEY_SECRET": "cxone-access-SECRET-6",
    }
    monkeypatch.setenv("LLM_GATEWAY_BASE_URL", BASE_URL)
    monkeypatch.setenv("CXONE_CLIENT_ID", "client-id")
    monkeypatch.setenv("CXONE_ACCESS_KEY_ID", "access-key-id")
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)

    settings = load_settings()

    assert settings.cxone_client_secret is not None
    assert settings.cxone_client_secret.get_secret_value() == "cxone-client-SECRET-5"
    for text in (repr(settings), str(settings)):
        assert "SECRET-" not in text
        assert "client-id" in text  # the representation is not simply empty


# --- chat_completions_url -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("https://h", "https://h/v1/chat/completions"),
        ("https://h/", "https://h/v1/chat/completions"),
        ("https://h/v1", "https://h/v1/chat/completions"),
        ("https://h/v1/", "https://h/v1/chat/completions"),
        ("https://h/openai/v1", "https://h/openai/v1/chat/completions"),
        ("https://h/v1/chat/completions", "https://h/v1/chat/completions"),
    ],
)
def test_chat_completions_url(base: str, expected: str) -> None:
    assert chat_completions_url(base) == expected


# --- parse_retry_after --------------------------------------------------------------------------

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", 3.0), ("0.5", 0.5), (" 7 ", 7.0)],
)
def test_parse_retry_after_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_http_date_in_the_future() -> None:
    header = email.utils.formatdate(NOW + 10, usegmt=True)
    wait = parse_retry_after(header, now=NOW)
    assert wait is not None
    assert wait == pytest.approx(10.0, abs=1.0)


def test_parse_retry_after_http_date_in_the_past_is_zero() -> None:
    header = email.utils.formatdate(NOW - 120, usegmt=True)
    assert parse_retry_after(header, now=NOW) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "not a date at all", "-4", "inf", "nan"])
def test_parse_retry_after_unusable_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


def test_several_workers_with_the_cxone_webhook_need_a_bot_state_secret(
    valid_env: pytest.MonkeyPatch,
) -> None:
    valid_env.setenv("CXONE_WEBHOOK_AUTHORIZATION", "Bearer t")
    valid_env.setenv("WORKERS", "3")
    assert "BOT_STATE_SECRET is not set, and WORKERS=3" in _config_error()
    valid_env.setenv("BOT_STATE_SECRET", "shared-by-all")
    assert load_settings().workers == 3


def test_a_redis_store_means_replicas_that_need_a_bot_state_secret(
    valid_env: pytest.MonkeyPatch,
) -> None:
    valid_env.setenv("CXONE_WEBHOOK_AUTHORIZATION", "Bearer t")
    valid_env.setenv("STORE_BACKEND", "redis")
    valid_env.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    assert "BOT_STATE_SECRET is not set, and STORE_BACKEND=redis" in _config_error()


def test_one_process_or_no_cxone_webhook_needs_no_bot_state_secret(
    valid_env: pytest.MonkeyPatch,
) -> None:
    valid_env.setenv("CXONE_WEBHOOK_AUTHORIZATION", "Bearer t")
    assert load_settings().bot_state_secret is None  # a restart costs its conversations only
    valid_env.delenv("CXONE_WEBHOOK_AUTHORIZATION")
    valid_env.setenv("WORKERS", "2")
    valid_env.setenv("SESSION_ID_SECRET", "shared-session-id-key")  # needed by several anyway
    assert load_settings().bot_state_secret is None  # no CXone state is ever signed


def test_simulated_workers_share_the_development_bot_state_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORKERS", "2")
    secret = load_settings(simulate=True).bot_state_secret
    assert secret is not None and secret.get_secret_value() == DEV_BOT_STATE_SECRET
    monkeypatch.setenv("BOT_STATE_SECRET", "my-own")
    secret = load_settings(simulate=True).bot_state_secret
    assert secret is not None and secret.get_secret_value() == "my-own"
