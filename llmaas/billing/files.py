"""Files of the Batch API (/v1/files): a row per file in the database, its bytes in a directory.

The directory is `$LLMAAS_HOME/files` unless the operator names another (`llmaas serve --files-dir`:
a path every replica shares). A file is written to a temporary name and renamed, so a crash never
leaves half a file under a file's id. An account sees only its own files: another account's id answers
exactly as an unknown id does (404). A deleted file's row stays (marked) so its id is never reused.
Every function blocks (database and disk I/O): callers run them in a worker thread.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select

from llmaas.billing.db import Database
from llmaas.billing.errors import NotFoundError
from llmaas.billing.schema import StoredFile, utcnow
from llmaas.errors import InvalidRequestError

DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
UPLOAD_PURPOSES = ("batch",)  # what a client may upload; batch_output / batch_error are written here
MAX_FILENAME = 256
MAX_LIST = 10_000


@dataclass(frozen=True)
class FileInfo:
    id: str
    account_id: int
    purpose: str
    filename: str
    bytes: int
    created_at: datetime


def _info(row: StoredFile) -> FileInfo:
    return FileInfo(row.id, row.account_id, row.purpose, row.filename, row.bytes, row.created_at)


def not_found(file_id: str, param: str | None = None) -> NotFoundError:
    return NotFoundError(f"No such File object: {file_id}", param=param)


class FileStore:
    def __init__(self, db: Database, directory: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES):
        if max_bytes < 1:
            raise InvalidRequestError("the file size limit must be positive", param="max-file-bytes")
        self.db, self.directory, self.max_bytes = db, Path(directory), max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, file_id: str) -> Path:
        return self.directory / file_id

    def save(self, account_id: int, purpose: str, filename: str, source: BinaryIO) -> FileInfo:
        """Copy `source` (read to its end) under a new id; at most `max_bytes` (400 naming `file`)."""
        if not filename or len(filename) > MAX_FILENAME or "/" in filename or "\x00" in filename:
            raise InvalidRequestError(
                f"the file name must be 1 to {MAX_FILENAME} characters, without '/'", param="file"
            )
        file_id = "file-" + secrets.token_hex(12)
        path = self._path(file_id)
        partial = path.with_suffix(".partial")
        size = 0
        try:
            with open(partial, "wb") as out:
                while chunk := source.read(1 << 20):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise InvalidRequestError(
                            f"the file is larger than this server's limit of {self.max_bytes} bytes",
                            param="file",
                        )
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return self._record(file_id, account_id, purpose, filename, size)

    def save_bytes(self, account_id: int, purpose: str, filename: str, data: bytes) -> FileInfo:
        """A file written by the server itself (a batch's output or errors)."""
        file_id = "file-" + secrets.token_hex(12)
        partial = self._path(file_id).with_suffix(".partial")
        with open(partial, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, self._path(file_id))
        return self._record(file_id, account_id, purpose, filename, len(data))

    def _record(self, file_id: str, account_id: int, purpose: str, filename: str, size: int) -> FileInfo:
        row = StoredFile(
            id=file_id,
            account_id=account_id,
            purpose=purpose,
            filename=filename,
            bytes=size,
            created_at=utcnow(),
        )
        try:
            with self.db.write() as session:
                session.add(row)
                session.flush()
                return _info(row)
        except BaseException:
            self._path(file_id).unlink(missing_ok=True)
            raise

    def get(self, account_id: int, file_id: str, param: str | None = None) -> FileInfo:
        with self.db.read() as session:
            row = session.get(StoredFile, file_id) if len(file_id) <= 64 else None
            if row is None or row.account_id != account_id or row.deleted_at is not None:
                raise not_found(file_id, param)
            return _info(row)

    def open(self, account_id: int, file_id: str, param: str | None = None) -> tuple[FileInfo, Path]:
        """The file's record and the path of its bytes."""
        info = self.get(account_id, file_id, param)
        return info, self._path(file_id)

    def list(self, account_id: int, purpose: str | None = None, limit: int = MAX_LIST) -> list[FileInfo]:
        """The account's files, newest first."""
        query = (
            select(StoredFile)
            .where(StoredFile.account_id == account_id, StoredFile.deleted_at.is_(None))
            .order_by(StoredFile.created_at.desc(), StoredFile.id)
            .limit(min(limit, MAX_LIST))
        )
        if purpose is not None:
            query = query.where(StoredFile.purpose == purpose)
        with self.db.read() as session:
            return [_info(row) for row in session.scalars(query)]

    def delete(self, account_id: int, file_id: str) -> None:
        with self.db.write() as session:
            row = session.get(StoredFile, file_id) if len(file_id) <= 64 else None
            if row is None or row.account_id != account_id or row.deleted_at is not None:
                raise not_found(file_id)
            row.deleted_at = utcnow()
        self._path(file_id).unlink(missing_ok=True)
