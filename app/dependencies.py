"""The shared parts built once by the lifespan, reached by routers through Depends()."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import httpx
from fastapi import Depends, Request

from app.accounting.inbound_limits import InboundLimiter
from app.accounting.ledger import Ledger
from app.accounting.metering import Metering
from app.auth.clients import ClientAuthenticator
from app.auth.signatures import AuthorizationAuthenticator, WebhookAuthenticator
from app.core.settings import Settings
from app.llm.provisioning import Provisioner
from app.llm.router import RouterSlot
from app.pipelines.chat import ChatPipeline
from app.prompts.caller_templates import CallerTemplates
from app.safety.session_ids import SessionIds
from app.store import Store
from app.store.audit import AuditLog
from app.surfaces.cognigy.pipeline import CognigyPipeline
from app.surfaces.cxone.pipeline import CXoneBotPipeline
from app.surfaces.openai.embeddings_pipeline import EmbeddingsPipeline


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
