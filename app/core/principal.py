"""Who is calling, settled once at the edge and carried through the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["webhook", "client", "admin", "anonymous"]

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: budgets, cache entries and ledger rows are scoped by `tenant`.

    `key_id` is a short fingerprint of the credential used, safe to log; never the credential.
    `scopes` is what a scoped client key or an issued access token may do (app.core.scopes);
    None, a credential without a scope list, may do everything its role allows.
    """

    tenant: str
    key_id: str
    role: Role
    scheme: str = ""
    scopes: frozenset[str] | None = None
