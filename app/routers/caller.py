"""The client credential every client route takes: a CLIENT_API_KEYS key (or the admin token)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from app.dependencies import ServicesDep
from app.errors import AuthenticationFailed
from app.principal import Principal

log = logging.getLogger("cxrelay.clients")


async def caller(request: Request, services: ServicesDep) -> Principal:
    try:
        return services.client_auth.authenticate(request.headers)
    except AuthenticationFailed as failure:
        log.warning(
            "client authentication failed",
            extra={
                "route": request.url.path,
                "reason": str(failure),
                "remote": request.client.host if request.client else "",
            },
        )
        raise HTTPException(401, str(failure), headers={"WWW-Authenticate": "Bearer"}) from None


CallerDep = Annotated[Principal, Depends(caller)]
