"""Durable storage for the batch lane: uploaded files, batch objects and per-batch result logs.

Layout under the storage directory:

    files/<file-id>.data        the file's bytes
    files/<file-id>.json        its OpenAI file object (written last: a file exists once this exists)
    batches/<batch-id>.json     the OpenAI batch object (status, counts, file ids)
    batches/<batch-id>.log      append-only results, one JSON line per finished input line

Every whole-file write goes to a temporary file, is fsynced and renamed over the
target, and the directory is fsynced: a crash leaves either the old or the new
version. The results log is appended line by line and fsynced in groups (ResultLog);
a line torn by a crash is cut off when the log is reopened. Ids are generated here and checked
against a strict pattern before they touch a path, so no request can name a
path outside the storage directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
BATCH_ID = re.compile(r"^batch_[0-9a-f]{32}$")


class NotFound(LookupError):
    """An unknown (or malformed) file or batch id."""

    def __init__(self, kind: str, object_id: str) -> None:
        super().__init__(f"no {kind} with id {object_id!r}")
        self.kind, self.object_id = kind, object_id

    def __reduce__(self):
        return (NotFound, (self.kind, self.object_id))


def _read_records(paths) -> list[dict]:
    """The JSON records at `paths`, less those deleted (or expired) since they were listed."""
    records = []
    for path in paths:
        try:
            records.append(json.loads(path.read_text()))
        except FileNotFoundError:
            continue
    return records


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def derived_file_id(batch_id: str, role: str) -> str:
    """A stable file id for a batch's output or error file, so finalizing twice writes one file."""
    return "file-" + hashlib.sha256(f"{batch_id}/{role}".encode()).hexdigest()[:32]


def _checked_path(kind: str, pattern: re.Pattern, folder: Path, object_id: str, suffix: str,
                  must_exist: bool) -> Path:
    """The path of a server-generated id; any other string is NotFound before it touches a path."""
    if not isinstance(object_id, str) or not pattern.match(object_id):
        raise NotFound(kind, str(object_id)[:80])
    path = folder / f"{object_id}{suffix}"
    if must_exist and not path.exists():
        raise NotFound(kind, object_id)
    return path


class BatchStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.files = self.root / "files"
        self.batches = self.root / "batches"
        self.files.mkdir(parents=True, exist_ok=True)
        self.batches.mkdir(parents=True, exist_ok=True)
        for stale in list(self.files.glob(".*.tmp")) + list(self.batches.glob(".*.tmp")):
            stale.unlink(missing_ok=True)  # left by a crash mid-write

    # --- files ---------------------------------------------------------------------

    def create_file(self, data: bytes, filename: str, purpose: str, file_id: str | None = None,
                    tenant: str | None = None, ttl_s: float | None = None) -> dict:
        """ttl_s: the file expires (is deleted by the runner's reaper) this long after now."""
        file_id = file_id or f"file-{uuid.uuid4().hex}"
        now = int(time.time())
        meta = {"id": file_id, "object": "file", "bytes": len(data), "created_at": now,
                "expires_at": None if ttl_s is None else now + int(ttl_s),
                "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        if tenant is not None:
            self.save_tenant("file", file_id, tenant)
        atomic_write(self.files / f"{file_id}.data", data)
        atomic_write(self.files / f"{file_id}.json", json.dumps(meta).encode())
        return meta

    def get_file(self, file_id: str) -> dict:
        return json.loads(self._file_path(file_id, ".json").read_text())

    def file_content(self, file_id: str) -> bytes:
        self.get_file(file_id)  # only committed files are readable
        return self._file_path(file_id, ".data").read_bytes()

    def list_files(self) -> list[dict]:
        metas = _read_records(self.files.glob("file-*.json"))
        return sorted(metas, key=lambda m: m["created_at"], reverse=True)

    def delete_file(self, file_id: str) -> None:
        meta = self._file_path(file_id, ".json")
        meta.unlink()  # uncommit first, then drop the data
        self._file_path(file_id, ".data", must_exist=False).unlink(missing_ok=True)
        self._file_path(file_id, ".tenant", must_exist=False).unlink(missing_ok=True)
        _fsync_dir(self.files)

    def _file_path(self, file_id: str, suffix: str, must_exist: bool = True) -> Path:
        return _checked_path("file", FILE_ID, self.files, file_id, suffix, must_exist)

    # --- batches -------------------------------------------------------------------

    def new_batch_id(self) -> str:
        return f"batch_{uuid.uuid4().hex}"

    def save_batch(self, batch: dict) -> None:
        atomic_write(self._batch_path(batch["id"], ".json", must_exist=False), json.dumps(batch).encode())

    def save_tenant(self, kind: str, object_id: str, tenant: str) -> None:
        """The tenant a file or batch belongs to (written before the object is committed)."""
        path = self._file_path(object_id, ".tenant", False) if kind == "file" else \
            self._batch_path(object_id, ".tenant", must_exist=False)
        atomic_write(path, tenant.encode())

    def tenant(self, kind: str, object_id: str) -> str | None:
        """A file's or batch's tenant; None for one made before tenants (the 'default' tenant's)."""
        path = self._file_path(object_id, ".tenant", False) if kind == "file" else \
            self._batch_path(object_id, ".tenant", must_exist=False)
        return path.read_text() if path.exists() else None

    def save_owner(self, batch_id: str, key: str) -> None:
        """The id of the API key that created a batch (its lines count against that key's limits)."""
        atomic_write(self._batch_path(batch_id, ".owner", must_exist=False), key.encode())

    def owner(self, batch_id: str) -> str | None:
        path = self._batch_path(batch_id, ".owner", must_exist=False)
        return path.read_text() if path.exists() else None

    def get_batch(self, batch_id: str) -> dict:
        return json.loads(self._batch_path(batch_id, ".json").read_text())

    def list_batches(self) -> list[dict]:
        batches = _read_records(self.batches.glob("batch_*.json"))
        return sorted(batches, key=lambda b: (b["created_at"], b["id"]), reverse=True)

    def delete_batch(self, batch_id: str) -> None:
        """A finished batch's record, owner, tenant, lease and results log (its output and
        error files are files, which expire by themselves)."""
        self._batch_path(batch_id, ".json").unlink()  # uncommit first
        for suffix in (".owner", ".tenant", ".lease", ".log"):
            self._batch_path(batch_id, suffix, must_exist=False).unlink(missing_ok=True)
        _fsync_dir(self.batches)

    def _batch_path(self, batch_id: str, suffix: str, must_exist: bool = True) -> Path:
        return _checked_path("batch", BATCH_ID, self.batches, batch_id, suffix, must_exist)

    # --- results logs ---------------------------------------------------------------

    def read_results(self, batch_id: str) -> list[dict[str, Any]]:
        """The results recorded so far; a torn last line (crash mid-append) is cut off."""
        path = self._batch_path(batch_id, ".log", must_exist=False)
        if not path.exists():
            return []
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]

    def open_results(self, batch_id: str) -> "ResultLog":
        return ResultLog(self._batch_path(batch_id, ".log", must_exist=False))

    # --- leases ---------------------------------------------------------------------

    def acquire_lease(self, batch_id: str, owner: str, ttl_s: float) -> bool:
        """Take or renew the batch's lease for `owner` for `ttl_s` seconds; False while another
        owner holds one that has not expired. Only the lease holder runs a batch and writes
        its results log. Atomic across the processes that share this storage (an exclusive
        POSIX lock around the read and the write)."""
        with self._lease_file(batch_id) as f:
            current = _read_lease(f)
            now = time.time()
            if current and current["owner"] != owner and current["expires_at"] > now:
                return False
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"owner": owner, "expires_at": now + ttl_s}))
            f.flush()
            os.fsync(f.fileno())
            return True

    def release_lease(self, batch_id: str, owner: str) -> None:
        with self._lease_file(batch_id) as f:
            current = _read_lease(f)
            if current and current["owner"] == owner:
                f.seek(0)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())

    @contextlib.contextmanager
    def _lease_file(self, batch_id: str):
        with open(self._batch_path(batch_id, ".lease", must_exist=False), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield f
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _read_lease(f) -> dict | None:
    f.seek(0)
    text = f.read()
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError:  # torn by a crash mid-write: as good as expired
        return None


class ResultLog:
    """Append-only. Each line is written to the file at once (a killed process loses none:
    the kernel holds it) and fsynced in groups by a thread of its own, at most SYNC_INTERVAL_S
    after it was written, so the event loop that appends never waits for the disk (it fsynced
    every line itself before). A machine that goes down loses at most the lines of the last
    interval, which are then run again: a line counts as done only once it is in the log, and
    readers keep one result per line."""

    SYNC_INTERVAL_S = 0.05

    def __init__(self, path: Path) -> None:
        self._file = open(path, "ab")
        _fsync_dir(path.parent)
        self._dirty = threading.Event()
        self._closed = False
        self._syncer = threading.Thread(target=self._sync_loop, name="result-log-fsync", daemon=True)
        self._syncer.start()

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self._file.flush()
        self._dirty.set()

    def _sync_loop(self) -> None:
        while not self._closed:
            self._dirty.wait()
            self._dirty.clear()
            if not self._closed:
                os.fsync(self._file.fileno())
                time.sleep(self.SYNC_INTERVAL_S)

    def close(self) -> None:
        self._closed = True
        self._dirty.set()
        self._syncer.join()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
