"""Wire formats of /admin/keys: client keys created at run time."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.keys.service import (
    MAX_SESSION_TOKENS,
    KeyView,
    check_name,
    check_scopes,
    check_tenant,
)


class KeyCreate(BaseModel):
    """A new key for `tenant`. Without `scopes` the key is allowed everywhere a client key is
    (as a CLIENT_API_KEYS entry without `;scopes=`); without `session_tokens` its sessions get
    the tenant's budget."""

    model_config = ConfigDict(extra="forbid")

    tenant: Annotated[str, AfterValidator(check_tenant)]
    name: Annotated[str | None, AfterValidator(check_name)] = Field(
        None, description="a label unique among the keys created here, e.g. the tool's name"
    )
    scopes: Annotated[list[str] | None, AfterValidator(check_scopes)] = Field(
        None, description='e.g. ["llm.gateway:invoke"]; leave out for no scope list'
    )
    session_tokens: int | None = Field(
        None, ge=1, le=MAX_SESSION_TOKENS, description="the key's own per-session token budget"
    )


class KeyOut(BaseModel):
    """A key as listed: `masked` shows its first characters, never the key."""

    id: str = Field(description="the key id of logs, budgets and the provider file's limits")
    source: Literal["api", "environment"]
    tenant: str
    name: str | None
    scopes: list[str] | None
    session_tokens: int | None
    masked: str | None = Field(description="`cxr_AbCd…`; null for a CLIENT_API_KEYS key")
    created_at: str | None
    rotated_at: str | None
    last_used_at: str | None = Field(
        description="updated at most once a minute per key and worker; null if never used "
        "(and for CLIENT_API_KEYS keys, not tracked)"
    )

    @classmethod
    def of(cls, view: KeyView) -> KeyOut:
        return cls.model_validate(view, from_attributes=True)


class KeyIssued(KeyOut):
    """The answer to create and rotate: `key` is shown this once and never again."""

    key: str = Field(description="the client key: store it now, it cannot be shown again")


class KeyList(BaseModel):
    keys: list[KeyOut]
