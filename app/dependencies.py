"""The shared parts built once by the lifespan, reached by routers through Depends()."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import httpx
from fastapi import Depends, Request

from app.config import Settings
from app.pipelines.chat import ChatPipeline
from app.pipelines.cognigy import CognigyPipeline
from app.pipelines.cxone import CXoneBotPipeline
from app.pipelines.embeddings import EmbeddingsPipeline
from app.services.audit import AuditLog
from app.services.caller_templates import CallerTemplates
from app.services.clients import ClientAuthenticator
from app.services.inbound_limits import InboundLimiter
from app.services.ledger import Ledger
from app.services.llm.router import RouterSlot
from app.services.metering import Metering
from app.services.provisioning import Provisioner
from app.services.session_ids import SessionIds
from app.services.signatures import AuthorizationAuthenticator, WebhookAuthenticator
from app.services.store import Store


@dataclass
class Services:
    settings: Settings
    http: httpx.AsyncClient
    webhook_auth: WebhookAuthenticator
    llm: RouterSlot
    cognigy: CognigyPipeline
    cxone_bot: CXoneBotPipeline
    chat: ChatPipeline
    embeddings: EmbeddingsPipeline
    caller_templates: CallerTemplates
    metering: Metering
    cxone_authorizations: AuthorizationAuthenticator
    audit: AuditLog
    provisioner: Provisioner
    store: Store
    ledger: Ledger
    client_auth: ClientAuthenticator
    limits: InboundLimiter
    session_ids: SessionIds  # a caller's session id -> the stored one (a digest when it is PII)
    simulated: dict[str, bool] = field(default_factory=dict)


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
