"""/admin/keys: client keys created, listed, rotated and revoked at run time (ADMIN_TOKEN).
Thin: the steps and their audit are app.keys.service's; here only the status codes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, status

from app.deps import ClientKeysDep
from app.http.body import LimitedBodyDep, parse_body
from app.http.openapi import HTTPError, ValidationErrorBody, error_response, json_request_body
from app.keys.service import KeyConflict, KeyNotFound, KeyRequestInvalid
from app.store.base import StoreUnavailable
from app.surfaces.admin.key_schemas import KeyCreate, KeyIssued, KeyList, KeyOut
from app.surfaces.admin.router import AdminDep, require_admin

router = APIRouter(
    prefix="/admin/keys",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={
        401: error_response("no ADMIN_TOKEN configured, or a missing or wrong token", HTTPError),
        429: error_response("too many wrong admin tokens from this address", HTTPError),
        503: error_response("the store could not be reached; nothing changed", HTTPError),
    },
)
_ONE_KEY: dict[int | str, dict[str, Any]] = {
    404: error_response("no key has this id", HTTPError),
    409: error_response("a CLIENT_API_KEYS key: change it there", HTTPError),
}

KeyId = Annotated[
    str, Path(pattern=r"^[0-9a-f]{8}$", description="the key's id (8 hex digits, as listed)")
]


def _refused(error: Exception) -> HTTPException:
    if isinstance(error, KeyNotFound):
        return HTTPException(404, str(error))
    if isinstance(error, KeyConflict):
        return HTTPException(409, str(error))
    if isinstance(error, KeyRequestInvalid):
        return HTTPException(422, str(error))
    return HTTPException(503, f"the store could not be reached; nothing changed ({error})")


_REFUSED = (KeyNotFound, KeyConflict, KeyRequestInvalid, StoreUnavailable)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyIssued,
    responses={
        409: error_response("a key of this name exists", HTTPError),
        413: error_response("body over MAX_BODY_BYTES", HTTPError),
        422: error_response("the field named in detail[].loc is wrong", ValidationErrorBody),
    },
    openapi_extra=json_request_body(KeyCreate),
)
async def create_key(admin: AdminDep, raw: LimitedBodyDep, keys: ClientKeysDep) -> KeyIssued:
    """A new key; the answer holds it, the only time it is shown. The body is read here (the
    admin token checked first, MAX_BODY_BYTES kept), so a body that is not JSON is a 422 as
    every other mistake in it."""
    body = parse_body(KeyCreate, raw)
    try:
        issued = await keys.create(
            tenant=body.tenant,
            name=body.name,
            scopes=body.scopes,
            session_tokens=body.session_tokens,
            actor=admin.actor,
        )
    except _REFUSED as error:
        raise _refused(error) from None
    return KeyIssued(key=issued.key, **KeyOut.of(issued.view).model_dump())


@router.get("", response_model=KeyList)
async def list_keys(keys: ClientKeysDep) -> KeyList:
    """Every key: CLIENT_API_KEYS' (source `environment`) and those created here (`api`)."""
    try:
        views = await keys.list()
    except StoreUnavailable as error:
        raise _refused(error) from None
    return KeyList(keys=[KeyOut.of(view) for view in views])


@router.post("/{key_id}/rotate", response_model=KeyIssued, responses=_ONE_KEY)
async def rotate_key(key_id: KeyId, keys: ClientKeysDep, admin: AdminDep) -> KeyIssued:
    """A new key for the same id, tenant, scopes and budget; the old one stops working now
    (on every worker within CLIENT_KEYS_REFRESH_SECONDS). No grace period."""
    try:
        issued = await keys.rotate(key_id, actor=admin.actor)
    except _REFUSED as error:
        raise _refused(error) from None
    return KeyIssued(key=issued.key, **KeyOut.of(issued.view).model_dump())


@router.delete("/{key_id}", response_model=KeyOut, responses=_ONE_KEY)
async def revoke_key(key_id: KeyId, keys: ClientKeysDep, admin: AdminDep) -> KeyOut:
    """Delete the key: 401 for it on every worker within CLIENT_KEYS_REFRESH_SECONDS. The
    answer is the key as it was."""
    try:
        return KeyOut.of(await keys.revoke(key_id, actor=admin.actor))
    except _REFUSED as error:
        raise _refused(error) from None
