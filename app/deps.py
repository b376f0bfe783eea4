"""One dependency per shared part, as `Annotated` aliases: a route's signature shows what it uses,
and a test replaces one part with `app.dependency_overrides[get_store] = ...`.

The lifespan builds the parts once (app.bootstrap.parts.build_parts) and keeps them on `app.state`;
each function below hands out one of them. `HTTPConnection` serves HTTP and WebSocket routes.
They are `async def` although they never wait: FastAPI runs a plain `def` dependency in the
thread pool, a thread hop per dependency per request."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import httpx
from fastapi import Depends
from starlette.requests import HTTPConnection

from app.accounting.inbound_limits import InboundLimiter
from app.accounting.ledger import Ledger
from app.auth.clients import ClientAuthenticator
from app.auth.signatures import AuthorizationAuthenticator, WebhookAuthenticator
from app.core.settings import Settings
from app.keys.service import ClientKeyService
from app.llm.gateways import GatewayService
from app.llm.provisioning import Provisioner
from app.llm.router import RouterSlot
from app.pipelines.chat import ChatPipeline
from app.prompts.caller_templates import CallerTemplates
from app.safety.session_ids import SessionIds
from app.store import Store
from app.store.audit import AuditLog

if TYPE_CHECKING:  # the composition root builds the parts; this module only hands them out
    from app.bootstrap.parts import Parts


def parts_of(connection: HTTPConnection) -> Parts:
    parts: Parts = connection.app.state.parts
    return parts


async def get_settings(connection: HTTPConnection) -> Settings:
    return parts_of(connection).settings


async def get_http_client(connection: HTTPConnection) -> httpx.AsyncClient:
    return parts_of(connection).http


async def get_router_slot(connection: HTTPConnection) -> RouterSlot:
    return parts_of(connection).llm


async def get_store(connection: HTTPConnection) -> Store:
    return parts_of(connection).store


async def get_ledger(connection: HTTPConnection) -> Ledger:
    return parts_of(connection).ledger


async def get_limiter(connection: HTTPConnection) -> InboundLimiter:
    return parts_of(connection).limits


async def get_session_ids(connection: HTTPConnection) -> SessionIds:
    return parts_of(connection).session_ids


async def get_client_auth(connection: HTTPConnection) -> ClientAuthenticator:
    return parts_of(connection).client_auth


async def get_webhook_auth(connection: HTTPConnection) -> WebhookAuthenticator:
    return parts_of(connection).webhook_auth


async def get_cxone_authorizations(connection: HTTPConnection) -> AuthorizationAuthenticator:
    return parts_of(connection).cxone_authorizations


async def get_chat_pipeline(connection: HTTPConnection) -> ChatPipeline:
    return parts_of(connection).chat


async def get_caller_templates(connection: HTTPConnection) -> CallerTemplates:
    return parts_of(connection).caller_templates


async def get_provisioner(connection: HTTPConnection) -> Provisioner:
    return parts_of(connection).provisioner


async def get_audit_log(connection: HTTPConnection) -> AuditLog:
    return parts_of(connection).audit


async def get_client_keys(connection: HTTPConnection) -> ClientKeyService:
    return parts_of(connection).keys


async def get_gateways(connection: HTTPConnection) -> GatewayService:
    return parts_of(connection).gateways


SettingsDep = Annotated[Settings, Depends(get_settings)]
HttpClientDep = Annotated[httpx.AsyncClient, Depends(get_http_client)]
RouterSlotDep = Annotated[RouterSlot, Depends(get_router_slot)]
StoreDep = Annotated[Store, Depends(get_store)]
LedgerDep = Annotated[Ledger, Depends(get_ledger)]
LimiterDep = Annotated[InboundLimiter, Depends(get_limiter)]
SessionIdsDep = Annotated[SessionIds, Depends(get_session_ids)]
ClientAuthDep = Annotated[ClientAuthenticator, Depends(get_client_auth)]
WebhookAuthDep = Annotated[WebhookAuthenticator, Depends(get_webhook_auth)]
CXoneAuthorizationsDep = Annotated[AuthorizationAuthenticator, Depends(get_cxone_authorizations)]
ChatPipelineDep = Annotated[ChatPipeline, Depends(get_chat_pipeline)]
CallerTemplatesDep = Annotated[CallerTemplates, Depends(get_caller_templates)]
ProvisionerDep = Annotated[Provisioner, Depends(get_provisioner)]
AuditLogDep = Annotated[AuditLog, Depends(get_audit_log)]
ClientKeysDep = Annotated[ClientKeyService, Depends(get_client_keys)]
GatewaysDep = Annotated[GatewayService, Depends(get_gateways)]
