"""/v1/files: upload (multipart, as the openai SDK sends it), list, retrieve, content, delete.

Files belong to the account of the key that uploaded them (billing/files.py keeps them). Served with
billing only: an account is what owns a file.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse

from llmaas.billing.files import MAX_LIST, UPLOAD_PURPOSES, FileInfo, FileStore
from llmaas.errors import InvalidRequestError
from llmaas.server.billing import PRINCIPAL
from llmaas.server.protocol import ERROR_RESPONSES

router = APIRouter()


async def account_of(request: Request) -> int:
    """The account whose files and batches a request sees."""
    billing = request.app.state.llmaas.billing
    return await asyncio.to_thread(billing.account_id, request.scope.get(PRINCIPAL))


def _files(request: Request) -> FileStore:
    return request.app.state.llmaas.files


def file_object(info: FileInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "file",
        "bytes": info.bytes,
        "created_at": int(info.created_at.timestamp()),
        "filename": info.filename,
        "purpose": info.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


@router.post("/v1/files", response_model=None, responses=ERROR_RESPONSES)
async def upload_file(
    request: Request, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form(max_length=32)]
) -> JSONResponse:
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequestError(
            f"'purpose' must be one of {', '.join(UPLOAD_PURPOSES)}, got {purpose!r}", param="purpose"
        )
    account = await account_of(request)
    info = await asyncio.to_thread(
        _files(request).save, account, purpose, file.filename or "upload", file.file
    )
    return JSONResponse(file_object(info))


@router.get("/v1/files", response_model=None, responses=ERROR_RESPONSES)
async def list_files(
    request: Request,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = MAX_LIST,
) -> JSONResponse:
    account = await account_of(request)
    infos = await asyncio.to_thread(_files(request).list, account, purpose, limit)
    data = [file_object(i) for i in infos]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )


@router.get("/v1/files/{file_id}", response_model=None, responses=ERROR_RESPONSES)
async def retrieve_file(file_id: str, request: Request) -> JSONResponse:
    account = await account_of(request)
    return JSONResponse(file_object(await asyncio.to_thread(_files(request).get, account, file_id)))


@router.get("/v1/files/{file_id}/content", response_model=None, responses=ERROR_RESPONSES)
async def file_content(file_id: str, request: Request) -> FileResponse:
    account = await account_of(request)
    info, path = await asyncio.to_thread(_files(request).open, account, file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=info.filename)


@router.delete("/v1/files/{file_id}", response_model=None, responses=ERROR_RESPONSES)
async def delete_file(file_id: str, request: Request) -> JSONResponse:
    account = await account_of(request)
    await asyncio.to_thread(_files(request).delete, account, file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})
