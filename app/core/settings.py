"""Settings from the environment (and `.env`), validated once at start-up.

Names are the integration tutorials' where they exist, without a prefix, so an `.env` written for
them works here; where a tutorial names a setting differently, its name is read too
(`validation_alias=AliasChoices(own, tutorial's)`, checked by app.core.setting_names). A wrong
value stops start-up with a message that names the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from app.core.credentials import (
    parse_basic_credential,
    parse_client_key,
    parse_oauth_client,
    split_tenant,
)
from app.core.limits import parse_limit_map
from app.core.setting_names import NamesChecked

AuthScheme = Literal["hmac", "standard_webhooks", "api_key", "basic", "oauth2"]
ALL_AUTH_SCHEMES: tuple[AuthScheme, ...] = (
    "hmac",
    "standard_webhooks",
    "api_key",
    "basic",
    "oauth2",
)

# Used only when the service runs simulated (`serve --simulate`) without a configured secret, so
# that the README's signed sample request works on a fresh clone. Never used otherwise.
DEV_WEBHOOK_SECRET = "cx-relay-dev-secret"
DEV_CXONE_AUTHORIZATION = "Bearer cx-relay-dev-token"
DEV_CLIENT_API_KEY = "cx-relay-dev-key"
MIN_ADMIN_TOKEN_CHARS = 16  # ADMIN_TOKEN: shorter is warned about at start-up
# Signs CXone's botSessionState in simulated mode without BOT_STATE_SECRET: a fixed value, so that
# several simulated workers (and a restart) still accept each other's state.
DEV_BOT_STATE_SECRET = "cx-relay-dev-bot-state-secret"

CommaList = Annotated[list[str], NoDecode]
SecretList = Annotated[list[SecretStr], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of the service; `.env.example` lists each one with its default."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # --- serving -------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # On SIGTERM: seconds the requests in flight get to finish (new connections are refused at
    # once); then they are cancelled and the service stops. Keep it under the orchestrator's own
    # limit (Kubernetes terminationGracePeriodSeconds, 30 by default; `docker stop -t`, 10).
    shutdown_grace_seconds: int = Field(20, ge=1, le=600)
    data_dir: Path = Path("./data")
    max_body_bytes: int = Field(256 * 1024, ge=1024, le=16 * 1024 * 1024)
    # A request's line and headers together: over this, 431 and the connection is closed. The
    # time from a request's first byte (a new connection's opening) to the end of its headers:
    # past this, 408 and the connection is closed. Enforced in the server, before the app.
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    header_read_timeout_seconds: float = Field(10.0, gt=0.0, le=300.0)
    simulate: bool = False
    # Which upstreams are served by the embedded simulators: set by `serve --simulate`, which
    # starts them, so /health can say so (not for setting by hand).
    simulated_upstreams: Annotated[list[Literal["llm", "cxone"]], NoDecode] = Field(
        default_factory=list
    )
    # Worker processes (uvicorn workers); over 1, /metrics adds up every worker's collectors
    # through PROMETHEUS_MULTIPROC_DIR (a fresh temporary directory when it is not set).
    workers: int = Field(1, ge=1, le=64)

    # --- LLM providers ---------------------------------------------------------------------------
    # PROVIDERS_FILE describes several providers, keys and routes; without it, the LLM_GATEWAY_*
    # variables describe one OpenAI-compatible provider whose key pool is LLM_GATEWAY_API_KEY.
    providers_file: Path | None = None
    # Also read as LLM_GATEWAY_URL (the CXone tutorial's name).
    llm_gateway_base_url: str | None = Field(
        None, validation_alias=AliasChoices("llm_gateway_base_url", "llm_gateway_url")
    )
    llm_gateway_api_key: SecretList = Field(default_factory=list)
    # Does the LLM_GATEWAY_* provider take OpenAI's `json_schema` response format? false: a
    # caller's schema goes in the system instruction (with `json_object`), for gateways that
    # refuse `json_schema` (a provider file says this per provider or model).
    llm_gateway_structured_outputs: bool = True
    llm_model: str = Field("gpt-4o-mini", min_length=1)
    # Conversational surfaces (CXone bot turns, /chat); the Cognigy routing decision has its own.
    llm_temperature: float = Field(0.7, ge=0.0, le=2.0)
    routing_temperature: float = Field(0.2, ge=0.0, le=2.0)
    llm_max_tokens: int = Field(1024, ge=16, le=32768)
    # The Cognigy routing decision's answer limit (a decision is ~50-150 tokens; reserving more
    # than it needs would exhaust a session's budget early). Never above LLM_MAX_TOKENS.
    routing_max_tokens: int = Field(300, ge=64, le=32768)
    # The LLM_GATEWAY_* provider's model: its context window and prices (USD per 1,000 tokens)
    # for the cost ledger. A provider file states these per model instead.
    llm_context_tokens: int = Field(128_000, ge=256, le=10_000_000)
    # What the LLM_GATEWAY_* model takes beside text (gpt-4o-mini: images, not audio); a /v1
    # request with a part the model does not take is refused with a 400 naming it.
    llm_vision: bool = True
    llm_audio: bool = False
    token_counting: Literal["exact", "estimate"] = "exact"  # estimate: no tokenizer (-53 MiB)
    llm_price_per_1k_prompt: float | None = Field(None, ge=0.0)
    llm_price_per_1k_completion: float | None = Field(None, ge=0.0)
    # The LLM_GATEWAY_* provider's embedding models (POST /v1/embeddings asks for them by name;
    # empty: none) and their price in USD per 1,000 input tokens. A provider file lists its own
    # (`kind: embedding`) instead.
    llm_embedding_models: CommaList = Field(default_factory=lambda: ["text-embedding-3-small"])
    llm_embedding_price_per_1k_input: float | None = Field(None, ge=0.0)
    llm_timeout_seconds: float = Field(5.0, gt=0.0, le=120.0)
    llm_max_attempts: int = Field(3, ge=1, le=10)
    llm_retry_initial_seconds: float = Field(0.2, ge=0.0, le=10.0)
    llm_retry_max_seconds: float = Field(2.0, ge=0.0, le=60.0)
    key_cooldown_seconds: float = Field(30.0, gt=0.0, le=3600.0)
    key_reprobe_seconds: float = Field(60.0, gt=0.0, le=86400.0)
    circuit_failure_threshold: int = Field(5, ge=1, le=1000)
    circuit_reset_seconds: float = Field(30.0, gt=0.0, le=3600.0)

    # --- store (budgets and the usage ledger) ----------------------------------------------------
    store_backend: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str | None = None
    redis_key_prefix: str = Field("cxrelay:", min_length=1, max_length=64)
    # normal: WAL without an fsync per commit (a process crash loses nothing committed, a power
    # cut may lose the last moments); full: every commit is on disk before it returns.
    sqlite_synchronous: Literal["normal", "full"] = "normal"

    # --- budgets (every surface: /chat, /v1/*, /ws/chat and both webhooks) -----------------------
    # A session's tokens (prompt + completion); "none" is unlimited. A client key may carry its
    # own (CLIENT_API_KEYS "key:tenant:tokens"); per tenant: "acme=8192,beta=none".
    budget_session_tokens: int | None = Field(4096, ge=1)
    budget_session_tokens_by_tenant: Annotated[dict[str, int | None], NoDecode] = Field(
        default_factory=dict
    )
    budget_tenant_day_tokens: int | None = Field(None, ge=1)
    budget_tenant_month_tokens: int | None = Field(None, ge=1)
    budget_tenant_day_cost: float | None = Field(None, gt=0)
    budget_tenant_month_cost: float | None = Field(None, gt=0)
    budget_lightweight_threshold: int = Field(1024, ge=0)
    budget_timezone: str = "UTC"
    budget_reservation_ttl_seconds: float = Field(300.0, ge=5.0, le=86400.0)

    # --- chat surfaces (/chat, /v1/chat/completions, /ws/chat) -----------------------------------
    chat_system_template: str = "chat_system.j2"
    chat_lightweight_template: str = "chat_system_lightweight.j2"
    chat_deadline_seconds: float = Field(30.0, gt=0.0, le=600.0)
    chat_first_token_timeout_seconds: float = Field(10.0, gt=0.0, le=120.0)
    chat_inline_template_max_chars: int = Field(8000, ge=100, le=200000)
    chat_fallback_response: str = Field(
        "I'm sorry, I can't help with that right now.", min_length=1
    )
    # A /chat answer that still broke the caller's schema after the repair: its 422 body carries
    # the model's text too (`raw_output`, after the output guard). For debugging only.
    debug_failed_output: bool = False
    # /ws/chat liveness (the tutorial's values): uvicorn pings every WS_PING_INTERVAL_SECONDS
    # (0 turns pings off) and drops a socket whose pong is WS_PONG_TIMEOUT_SECONDS late; the
    # route closes a socket with no request and no answer running for WS_IDLE_TIMEOUT_SECONDS.
    ws_ping_interval_seconds: float = Field(20.0, ge=0.0, le=3600.0)
    ws_pong_timeout_seconds: float = Field(10.0, gt=0.0, le=3600.0)
    ws_idle_timeout_seconds: float = Field(30.0, gt=0.0, le=86400.0)

    # --- embeddings (/v1/embeddings) -------------------------------------------------------------
    # Every attempt, retry and fallback of one request together (504 after it).
    embeddings_deadline_seconds: float = Field(30.0, gt=0.0, le=600.0)

    # --- intent cache and prompt-injection sanitising (every surface) ----------------------------
    intent_cache_enabled: bool = True
    intent_cache_ttl_seconds: float = Field(3600.0, gt=0.0, le=7 * 86400.0)
    intent_cache_max_entries: int = Field(10_000, ge=1, le=10_000_000)
    # filter: redact with the budgets tutorial's "[FILTERED]" instead of "[REMOVED]"
    prompt_injection_mode: Literal["off", "flag", "redact", "filter"] = "flag"

    # --- client API keys (internal tools: /budget/*, and the chat surfaces) ----------------------
    client_api_keys: SecretList = Field(default_factory=list)  # "key:tenant" pairs
    client_keys_refresh_seconds: float = Field(
        0.25,
        ge=0.05,
        le=1.0,
        description=(
            "How often each worker checks the store for client keys created, rotated or revoked "
            "through /admin/keys or `python -m app keys` (one small read). A revoked key stops "
            "working everywhere within about this long."
        ),
    )

    # --- OAuth2 client credentials (POST /api/v1/auth/token) ------------------------------------
    # "client_id:secret:tenant;scopes=a+b" entries (the secret may be "sha256:<hex digest>"); the
    # tokens they get are accepted wherever a client key is (and on the Cognigy webhook).
    oauth_clients: SecretList = Field(default_factory=list)
    # Signs the tokens (HMAC-SHA256); the same on every worker and replica. Unset: derived from
    # BOT_STATE_SECRET, else a key of this process only (refused with several processes).
    access_token_secret: SecretStr | None = None
    access_token_ttl_seconds: int = Field(3600, ge=60, le=86400)
    # Failed token requests (wrong secret) allowed per minute, per client_id (from every address)
    # and per source address; over either: 429 with Retry-After. "none" lifts one.
    oauth_max_failures_per_client: int | None = Field(60, ge=1)
    oauth_max_failures_per_address: int | None = Field(10, ge=1)

    # --- inbound limits, per client key and per tenant (its keys together), every surface -----
    # (per worker unless STORE_BACKEND=redis); "none" lifts one; the provider file's `limits:`
    # overrides them per tenant or key. TPM: prompt + max_tokens, settled to the usage after.
    client_rate_limit_rpm: int | None = Field(600, ge=1)
    client_rate_limit_tpm: int | None = Field(None, ge=1)
    client_max_concurrent_streams: int | None = Field(20, ge=1)

    # --- provisioning (admin) API ----------------------------------------------------------------
    admin_token: SecretStr | None = Field(
        None,
        description=(
            "The bearer token of /admin (provider changes, client keys, the audit log); unset, "
            f"the admin API answers 401. Use at least {MIN_ADMIN_TOKEN_CHARS} random characters "
            "(e.g. `openssl rand -hex 32`): a shorter one is warned about at start-up."
        ),
    )
    admin_max_failures_per_address: int | None = Field(
        10,
        ge=1,
        description=(
            "Wrong admin tokens allowed per minute from one source address; over it /admin "
            "answers 429 with Retry-After (a right token is not counted). `none` lifts it."
        ),
    )
    admin_notify_urls: CommaList = Field(default_factory=list)
    # What key directives a configuration sent through the API may name (the provider file is
    # not limited): env: variables starting with this prefix ("" refuses env:), and files below
    # this directory (unset refuses file:). The service's own secrets are refused regardless.
    provisioning_env_prefix: str = Field("CXR_PROVIDER_KEY_", pattern=r"^[A-Za-z0-9_]*$")
    provisioning_secrets_dir: Path | None = None

    # --- /metrics: open (Prometheus' convention) unless a bearer token is set ---------------------
    metrics_token: SecretStr | None = None

    # --- Cognigy fallback webhook --------------------------------------------------------------
    cognigy_webhook_secret: SecretList = Field(default_factory=list)
    cognigy_api_keys: SecretList = Field(default_factory=list)
    # The tutorial's single key: one more entry of COGNIGY_API_KEYS.
    cognigy_api_key: SecretStr | None = None
    # HTTP Basic credentials for the node's "Basic Auth": "username:password:tenant" entries.
    cognigy_basic_auth: SecretList = Field(default_factory=list)
    cognigy_auth_schemes: Annotated[list[AuthScheme], NoDecode] = Field(
        default_factory=lambda: list(ALL_AUTH_SCHEMES)
    )
    allow_unauthenticated_webhooks: bool = False
    webhook_timestamp_tolerance_seconds: int = Field(300, ge=1, le=3600)
    cognigy_confidence_threshold: float = Field(0.75, ge=0.0, le=1.0)
    cognigy_deadline_seconds: float = Field(7.0, gt=0.0, le=60.0)
    cognigy_repair_min_seconds: float = Field(1.0, ge=0.0, le=30.0)
    cognigy_system_template: str = "cognigy_routing_system.j2"
    cognigy_user_template: str = "cognigy_routing_user.j2"
    cognigy_fallback_response: str = Field(
        "I'm connecting you with a member of our team who can help with that.", min_length=1
    )

    # --- CXone bot webhook (Virtual Agent Hub custom exchange endpoint) ------------------------
    cxone_webhook_authorization: SecretList = Field(default_factory=list)
    bot_state_secret: SecretStr | None = None
    cxone_deadline_seconds: float = Field(8.0, gt=0.0, le=60.0)
    cxone_first_token_timeout_seconds: float = Field(3.0, gt=0.0, le=60.0)
    cxone_system_template: str = "cxone_bot_system.j2"
    cxone_greeting: str = "Hello! I'm the virtual assistant. How can I help you today?"
    cxone_reprompt: str = "Sorry, I didn't catch that. How can I help you?"
    cxone_max_no_input: int = Field(3, ge=1, le=20)
    cxone_max_failures: int = Field(2, ge=1, le=20)
    fallback_bot_response: str = Field(
        "I'm sorry, I'm having trouble answering right now. Could you please say that again?",
        min_length=1,
    )
    cxone_comfort_prompt: str = "One moment, please."
    cxone_response_delay_tolerance_ms: int = Field(2000, ge=0, le=60000)
    cxone_wait_for_user_ms: int = Field(10000, ge=0, le=300000)
    cxone_state_max_messages: int = Field(20, ge=2, le=200)
    cxone_state_max_chars: int = Field(8000, ge=200, le=200000)
    cxone_state_max_bytes: int = Field(32768, ge=1024, le=1048576)
    cxone_metrics_in_payload: bool = True

    # --- safety ----------------------------------------------------------------------------------
    redact_pii_input: bool = False
    unsafe_output_categories: CommaList = Field(
        default_factory=lambda: [
            "self_harm",
            "violence",
            "profanity",
            "credentials",
            "illegal_activity",
        ]
    )
    safety_rules_dir: Path | None = None
    # Keys the digest that replaces a session id holding personal data (an e-mail address, a card
    # number) in logs, the ledger and /budget; the same value on every worker and replica. Unset:
    # derived from BOT_STATE_SECRET, else (one worker, SQLite) a per-process random key.
    session_id_secret: SecretStr | None = None

    # --- CXone context (Digital Engagement API) ------------------------------------------------
    cxone_client_id: str | None = None
    cxone_client_secret: SecretStr | None = None
    cxone_access_key_id: str | None = None
    cxone_access_key_secret: SecretStr | None = None
    # Unset: the password grant when CXONE_ACCESS_KEY_ID is set, else client credentials (what
    # the tutorials' CXONE_CLIENT_ID/CXONE_CLIENT_SECRET alone ask for).
    cxone_grant_type: Literal["password", "client_credentials"] | None = None
    cxone_token_url: str = "https://cxone.niceincontact.com/auth/token"
    cxone_api_base_url: str | None = None
    cxone_discovery_url: str = "https://cxone.niceincontact.com/.well-known/cxone-configuration"
    # Also read as CXONE_TENANT (the CXone tutorial's name), when it holds a tenant id.
    cxone_tenant_id: str | None = Field(
        None, validation_alias=AliasChoices("cxone_tenant_id", "cxone_tenant")
    )
    cxone_history_turns: int = Field(10, ge=0, le=200)
    cxone_timeout_seconds: float = Field(2.0, gt=0.0, le=30.0)
    cxone_token_refresh_margin_seconds: float = Field(60.0, ge=0.0, le=3600.0)

    # --- health probes (/health, /health/ready) --------------------------------------------------
    # Provider probes are reused this long and shared by concurrent requests (no upstream storm).
    health_cache_seconds: float = Field(5.0, ge=0.0, le=300.0)
    health_probe_timeout_seconds: float = Field(2.0, gt=0.0, le=30.0)  # one provider probe
    health_store_timeout_seconds: float = Field(1.0, gt=0.0, le=30.0)  # the store ping

    # --- shared HTTP client --------------------------------------------------------------------
    http_max_connections: int = Field(200, ge=1, le=10000)
    http_max_keepalive_connections: int = Field(100, ge=0, le=10000)
    http_connect_timeout_seconds: float = Field(2.0, gt=0.0, le=60.0)
    http_transport: Literal["aiohttp", "httpx"] = "aiohttp"

    _split = field_validator(
        "cognigy_webhook_secret",
        "cognigy_api_keys",
        "cognigy_auth_schemes",
        "llm_gateway_api_key",
        "llm_embedding_models",
        "admin_notify_urls",
        "cxone_webhook_authorization",
        "unsafe_output_categories",
        "client_api_keys",
        "oauth_clients",
        "cognigy_basic_auth",
        "simulated_upstreams",
        mode="before",
    )(_split_commas)

    @field_validator(
        "client_api_keys",
        "cognigy_webhook_secret",
        "cognigy_api_keys",
        "cxone_webhook_authorization",
    )
    @classmethod
    def _one_tenant_per_credential(
        cls, values: list[SecretStr], info: ValidationInfo
    ) -> list[SecretStr]:
        """`value:tenant` entries: one value under two tenants would leave which one pays to
        chance, so it stops start-up (naming the tenants, never the value)."""
        tenants: dict[str, set[str]] = {}
        for entry in values:
            if info.field_name == "client_api_keys":
                value, tenant, *_ = parse_client_key(entry.get_secret_value())
            else:
                value, tenant = split_tenant(entry.get_secret_value())
            tenants.setdefault(value, set()).add(tenant)
        for names in tenants.values():
            if len(names) > 1:
                raise ValueError(
                    f"one credential is listed for several tenants ({', '.join(sorted(names))}): "
                    "give each tenant its own"
                )
        return values

    @field_validator("oauth_clients")
    @classmethod
    def _oauth_clients(cls, values: list[SecretStr]) -> list[SecretStr]:
        """Each entry readable, each client id once (two secrets for one id would leave which
        tenant its tokens name to chance)."""
        seen: set[str] = set()
        for entry in values:
            client_id = parse_oauth_client(entry.get_secret_value()).client_id
            if client_id in seen:
                raise ValueError(f"client {client_id!r} is listed twice: keep one entry")
            seen.add(client_id)
        return values

    @field_validator("cognigy_basic_auth")
    @classmethod
    def _basic_credentials(cls, values: list[SecretStr]) -> list[SecretStr]:
        """Each entry readable, each username once (its tenant must be one)."""
        seen: set[str] = set()
        for entry in values:
            username, _, _ = parse_basic_credential(entry.get_secret_value())
            if username in seen:
                raise ValueError(f"username {username!r} is listed twice: keep one entry")
            seen.add(username)
        return values

    @field_validator("budget_session_tokens", mode="before")
    @classmethod
    def _none_is_unlimited(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("none", "unlimited"):
            return None
        return value

    @field_validator("budget_session_tokens_by_tenant", mode="before")
    @classmethod
    def _limit_map(cls, value: object) -> object:
        return parse_limit_map(value) if isinstance(value, str) else value

    @field_validator("budget_timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (an IANA name such as UTC or Europe/Berlin)"
            ) from None
        return value

    @field_validator(
        "budget_tenant_day_tokens",
        "budget_tenant_month_tokens",
        "budget_tenant_day_cost",
        "budget_tenant_month_cost",
        "llm_price_per_1k_prompt",
        "llm_price_per_1k_completion",
        "llm_embedding_price_per_1k_input",
        "client_rate_limit_rpm",
        "client_rate_limit_tpm",
        "client_max_concurrent_streams",
        "oauth_max_failures_per_client",
        "oauth_max_failures_per_address",
        "admin_max_failures_per_address",
        mode="before",
    )
    @classmethod
    def _blank_is_no_limit(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @field_validator(
        "llm_gateway_base_url",
        "cognigy_api_key",
        "cxone_grant_type",
        "cxone_api_base_url",
        "providers_file",
        "safety_rules_dir",
        "provisioning_secrets_dir",
        "bot_state_secret",
        "session_id_secret",
        "access_token_secret",
        "metrics_token",
        "redis_url",
        "admin_token",
        "cxone_client_id",
        "cxone_client_secret",
        "cxone_access_key_id",
        "cxone_access_key_secret",
        "cxone_tenant_id",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("llm_gateway_base_url", "cxone_api_base_url", "cxone_token_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/") if value else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The usual sources, after a check of the names the environment and `.env` use (two
        names of one setting disagreeing is a mistake nobody should find out about from which
        one happened to win)."""
        checked = NamesChecked(settings_cls, env_settings, dotenv_settings)
        return init_settings, checked, env_settings, dotenv_settings, file_secret_settings

    @model_validator(mode="after")
    def _tutorial_aliases(self) -> Settings:
        """The inference tutorial's (000) single COGNIGY_API_KEY is one more entry of the list."""
        key = self.cognigy_api_key
        if key is not None and key.get_secret_value() not in (
            k.get_secret_value() for k in self.cognigy_api_keys
        ):
            self.cognigy_api_keys = [*self.cognigy_api_keys, key]
        return self

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if not self.simulate and not self.llm_gateway_base_url and not self.providers_file:
            raise ValueError(
                "LLM_GATEWAY_BASE_URL is not set: point it at an OpenAI-compatible provider "
                "(or set PROVIDERS_FILE), or run `python -m app serve --simulate` for the "
                "embedded simulated provider"
            )
        if self.simulate and not (self.cognigy_webhook_secret or self.cognigy_api_keys):
            self.cognigy_webhook_secret = [SecretStr(DEV_WEBHOOK_SECRET)]
        if self.simulate and not self.cxone_webhook_authorization:
            self.cxone_webhook_authorization = [SecretStr(DEV_CXONE_AUTHORIZATION)]
        if self.simulate and not self.client_api_keys:
            self.client_api_keys = [SecretStr(DEV_CLIENT_API_KEY)]
        if self.simulate and self.bot_state_secret is None:
            self.bot_state_secret = SecretStr(DEV_BOT_STATE_SECRET)
        self._one_bot_state_secret_for_every_process()
        inbound = self.webhook_credentials_configured or bool(self.cxone_webhook_authorization)
        if not inbound and not self.allow_unauthenticated_webhooks:
            raise ValueError(
                "no inbound webhook credential: set COGNIGY_WEBHOOK_SECRET, COGNIGY_API_KEYS, "
                "COGNIGY_BASIC_AUTH or OAUTH_CLIENTS for the Cognigy webhook, "
                "CXONE_WEBHOOK_AUTHORIZATION (the Authorization header value the Virtual Agent "
                "Hub sends) for the CXone webhook, or both (or "
                "ALLOW_UNAUTHENTICATED_WEBHOOKS=true, for development only); a webhook without "
                "its credential answers 401"
            )
        if self.cxone_grant_type is None:
            self.cxone_grant_type = (
                "password" if self.cxone_access_key_id is not None else "client_credentials"
            )
        if (
            self.cxone_configured
            and self.cxone_grant_type == "password"
            and not (self.cxone_access_key_id and self.cxone_access_key_secret)
        ):
            raise ValueError(
                "CXONE_GRANT_TYPE=password needs CXONE_ACCESS_KEY_ID and CXONE_ACCESS_KEY_SECRET"
            )
        if self.store_backend == "redis" and not self.redis_url:
            raise ValueError("STORE_BACKEND=redis needs REDIS_URL (e.g. redis://redis:6379/0)")
        if self.cxone_configured and not self.cxone_client_secret:
            raise ValueError("CXONE_CLIENT_ID is set but CXONE_CLIENT_SECRET is not")
        return self

    @model_validator(mode="after")
    def _embedding_models_apart(self) -> Settings:
        """LLM_MODEL answers chats: the same name as an embedding model of the one provider
        would leave which of the two a request means to chance."""
        if self.providers_file is None and self.llm_model in self.llm_embedding_models:
            raise ValueError(
                f"LLM_EMBEDDING_MODELS names LLM_MODEL ({self.llm_model!r}): the webhooks and "
                "chat surfaces need a chat model, /v1/embeddings an embedding model"
            )
        return self

    def _one_bot_state_secret_for_every_process(self) -> None:
        """Without BOT_STATE_SECRET each process signs botSessionState with a random key of its
        own, so a CXone turn that reaches another worker or replica fails verification and its
        conversation starts again (counted as "tampered"). With one process that only costs a
        restart's conversations; with several it breaks most of them, so it stops start-up.
        Unneeded while the CXone webhook is off (no state is ever signed)."""
        if self.bot_state_secret is not None or not self.cxone_webhook_enabled:
            return
        if self.workers > 1:
            several = f"WORKERS={self.workers} runs that many worker processes"
        elif self.store_backend == "redis":
            several = "STORE_BACKEND=redis is for several replicas"
        else:
            return
        raise ValueError(
            f"BOT_STATE_SECRET is not set, and {several}: each process would sign CXone's "
            "botSessionState with a random key of its own, so a turn served by another one "
            "would be rejected and its conversation started afresh. Set BOT_STATE_SECRET to one "
            "random value shared by every worker and replica (e.g. the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )

    @property
    def cxone_webhook_enabled(self) -> bool:
        """CXone turns are accepted (and their state signed)."""
        return bool(self.cxone_webhook_authorization) or self.allow_unauthenticated_webhooks

    @model_validator(mode="after")
    def _shared_session_id_key(self) -> Settings:
        """Several processes digesting session ids with keys of their own would each store the
        same caller's session under another id: its budget counted apart on each, its records
        read back only where they were written."""
        several = self.workers > 1 or self.store_backend == "redis"
        shared = self.session_id_secret or self.bot_state_secret
        if several and shared is None and not self.simulate:
            raise ValueError(
                "SESSION_ID_SECRET is not set (nor BOT_STATE_SECRET, from which it is otherwise "
                "derived): with several workers (WORKERS>1) or replicas (STORE_BACKEND=redis) "
                "each process would digest session ids holding personal data with a random key "
                "of its own, splitting such a session's budget and ledger; set SESSION_ID_SECRET "
                "to the same random value (e.g. `openssl rand -hex 32`) on every replica"
            )
        return self

    @model_validator(mode="after")
    def _shared_access_token_key(self) -> Settings:
        """Tokens signed with a key of one process would be refused by every other one."""
        several = self.workers > 1 or self.store_backend == "redis"
        shared = self.access_token_secret or self.bot_state_secret
        if self.oauth_clients and several and shared is None:
            raise ValueError(
                "ACCESS_TOKEN_SECRET is not set (nor BOT_STATE_SECRET, from which it is "
                "otherwise derived): with several workers (WORKERS>1) or replicas "
                "(STORE_BACKEND=redis) a token issued by one process would be refused by the "
                "others; set ACCESS_TOKEN_SECRET to the same random value on every replica"
            )
        return self

    @property
    def webhook_credentials_configured(self) -> bool:
        return bool(
            self.cognigy_webhook_secret
            or self.cognigy_api_keys
            or self.cognigy_basic_auth
            or self.oauth_clients
        )

    @property
    def using_dev_secret(self) -> bool:
        return any(s.get_secret_value() == DEV_WEBHOOK_SECRET for s in self.cognigy_webhook_secret)

    @property
    def cxone_configured(self) -> bool:
        return bool(self.cxone_client_id)
