"""The batch lane: OpenAI Batch API jobs, run at batch priority through the router.

`BatchRunner` is a Serve deployment (one replica) that owns the batch store. It
validates and stores uploaded files, creates batches, and runs each open batch
as an asyncio task: every input line goes through the same `OpenAIServing` path
as the realtime lane, in the router's batch lane (so realtime work is always
admitted first), with at most `batch.max_concurrency` lines waiting or running
at once across all batches.

Exactly once: a finished line is appended to the batch's results log (fsynced
within 50 ms, off the event loop) before it counts as done; after a restart the runner reopens every batch that
was not finished, skips the lines the log already holds and runs the rest. The
output and error files are built from the log, in input order, one record per
line.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from deployments.batch.store import BatchStore, NotFound, derived_file_id
from deployments.config import SemlineConfig, may_see
from cluster.admission import BATCH_LANE
from deployments.api.errors import APIError
from deployments.api.serving import ENDPOINTS, OpenAIServing
from deployments.api.protocol import window_seconds

logger = logging.getLogger(__name__)

# A batch's lease (seconds), renewed every third of it while its runner works.
LEASE_TTL_S = 30.0
OPEN_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")

# What the ingress may call through BatchRunner.call.
BATCH_API = ("create_file", "get_file", "file_content", "list_files", "delete_file", "create_batch", "get_batch",
             "list_batches", "cancel_batch")

RETRYABLE = (429, 500, 503)  # router full or timed out, a replica that died: try the line again


@dataclass
class InputLine:
    key: tuple  # ("id", custom_id) for a valid line, ("line", n) for one that is not
    line_no: int
    custom_id: str | None = None
    body: dict | None = None
    error: dict | None = None  # {"code", "message"} for a line that cannot run


@dataclass
class Job:
    batch: dict
    cancelled: bool = False
    expired: bool = False  # its completion window ended before its lines did
    tasks: set = field(default_factory=set)
    task: asyncio.Task | None = None
    last_saved: float = 0.0
    key: str | None = None  # the id of the API key that created it: per-key limits apply to its lines


def parse_input(data: bytes, endpoint: str) -> list[InputLine]:
    """One InputLine per non-blank line; lines that cannot run carry an error."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the input file is not UTF-8: {exc}", param="input_file_id") from exc
    lines, seen = [], set()
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        line = InputLine(key=("line", n), line_no=n)
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            line.error = {"code": "invalid_json_line", "message": f"line {n} is not valid JSON: {exc}"}
            lines.append(line)
            continue
        custom_id = item.get("custom_id") if isinstance(item, dict) else None
        if not isinstance(custom_id, str) or not custom_id:
            line.error = {"code": "missing_custom_id", "message": f"line {n} has no string custom_id"}
        elif custom_id in seen:
            raise APIError(400, f"custom_id {custom_id!r} appears more than once (line {n}); "
                                "custom_ids must be unique within a batch", param="input_file_id")
        else:
            seen.add(custom_id)
            line.key, line.custom_id = ("id", custom_id), custom_id
            if item.get("method") != "POST":
                line.error = {"code": "invalid_method", "message": f"line {n}: method must be POST"}
            elif item.get("url") != endpoint:
                line.error = {"code": "invalid_url",
                              "message": f"line {n}: url {item.get('url')!r} does not match the batch's "
                                         f"endpoint {endpoint!r}"}
            elif not isinstance(item.get("body"), dict):
                line.error = {"code": "invalid_body", "message": f"line {n}: body must be a JSON object"}
            else:
                line.body = item["body"]
        lines.append(line)
    if not lines:
        raise APIError(400, "the input file has no requests", param="input_file_id")
    if all(line.error and line.error["code"] == "invalid_json_line" for line in lines):
        raise APIError(400, "the input file is not JSONL (no line is a JSON object)", param="input_file_id")
    return lines


def result_record(custom_id: str | None, response: tuple[int, dict] | None, error: dict | None) -> dict:
    """One line of an OpenAI batch output (or error) file."""
    record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None, "error": error}
    if response is not None:
        status, body = response
        record["response"] = {"status_code": status, "request_id": body.get("id", record["id"]), "body": body}
    return record


def record_kind(record: dict) -> str:
    """'output' for a line answered with 200, 'error' for the rest (OpenAI's two files)."""
    response = record["response"]
    return "output" if response is not None and response["status_code"] == 200 else "error"


async def answer_line(serving: OpenAIServing, endpoint: str, body: dict, key: str | None = None) -> tuple[int, dict]:
    """Run one batch line through the serving path: (200, response body) or (status, error body).
    Raises APIError only for statuses worth a retry (RETRYABLE). key: the id of the API key
    that created the batch (its per-key limits hold the line back: 429, retried)."""
    try:
        return 200, await serving.respond(endpoint, body, BATCH_LANE, key)
    except APIError as exc:
        if exc.status in RETRYABLE:
            raise
        return exc.status, exc.body()


def _unique(results: list[dict]) -> list[dict]:
    """One result per input line, the first written: two runners that overlapped (Serve
    replacing one) may both have answered a line; each custom_id is reported once."""
    seen, unique = set(), []
    for result in results:
        key = tuple(result["key"])
        if key not in seen:
            seen.add(key)
            unique.append(result)
    return unique


def _count(batch: dict, results: list[dict]) -> None:
    """request_counts from the results log (the truth; the counts saved on disk are a hint)."""
    results = _unique(results)
    batch["request_counts"].update(completed=sum(r["kind"] == "output" for r in results),
                                   failed=sum(r["kind"] == "error" for r in results))


class BatchRunner:
    async def __init__(self, llm, config: SemlineConfig) -> None:
        self.config = config
        self.settings = config.batch
        self.store = BatchStore(self.settings.storage_dir)
        self.owner = f"runner-{uuid.uuid4().hex[:12]}"  # this replica, as lease holder
        self.serving = OpenAIServing(llm, config)
        self.slots = asyncio.Semaphore(self.settings.max_concurrency)
        self.jobs: dict[str, Job] = {}
        self._storage_lock = asyncio.Lock()
        for batch in self.store.list_batches():
            if batch["status"] in OPEN_STATUSES:
                logger.info("resuming batch %s (%s)", batch["id"], batch["status"])
                self._start(batch)
        self._reaper = asyncio.get_running_loop().create_task(self._reap_loop(), context=contextvars.Context())

    async def call(self, method: str, *args):
        """The ingress's entry point: a client error (APIError) comes back as the value, not
        raised, so Serve does not log every 4xx as a failed request with a traceback."""
        if method not in BATCH_API:
            raise ValueError(f"not a batch API method: {method!r}")
        try:
            return await getattr(self, method)(*args)
        except APIError as exc:
            return exc

    # --- files ---------------------------------------------------------------------

    # Every method takes the caller first: (tenant name, is admin), or None where there are no
    # tenants. Files and batches are their tenant's; another tenant's are 404 (config.may_see).

    async def create_file(self, caller, data: bytes, filename: str, purpose: str, ttl_s: float | None = None) -> dict:
        if purpose != "batch":
            raise APIError(400, f"purpose must be 'batch', got {purpose!r}", param="purpose")
        if not data.strip():
            raise APIError(400, "the file is empty", param="file")
        if len(data) > self.settings.max_file_bytes:
            raise APIError(413, f"file larger than {self.settings.max_file_bytes} bytes", code="file_too_large")
        async with self._storage_lock:  # the bound is checked and the file written as one step
            await asyncio.to_thread(self._check_storage, caller, len(data))
            return await asyncio.to_thread(self.store.create_file, data, filename, purpose,
                                           tenant=None if caller is None else caller[0], ttl_s=ttl_s)

    def _check_storage(self, caller, size: int) -> None:
        """Room for `size` more bytes of files: in the whole store, and in the caller's tenant's
        bound (413 for the caller; what others hold is never touched)."""
        files = self.store.list_files()
        held = sum(f["bytes"] for f in files)
        if held + size > self.settings.max_storage_bytes:
            raise APIError(413, f"the batch file store holds {held} bytes; this file would pass its bound "
                           f"({self.settings.max_storage_bytes}): delete files, or wait for some to expire",
                           code="storage_full")
        tenant = self.config.tenant(caller[0]) if caller is not None else None
        bound = tenant.batch_storage_bytes if tenant is not None else None
        if bound is not None:
            mine = sum(f["bytes"] for f in files if self.store.tenant("file", f["id"]) == tenant.name)
            if mine + size > bound:
                raise APIError(413, f"tenant {tenant.name!r} holds {mine} bytes of batch files; this file would "
                               f"pass its bound ({bound}): delete files first", code="tenant_storage_full")

    # The store reads and writes files (fsynced): in a thread, never on the replica's event loop.

    async def get_file(self, caller, file_id: str) -> dict:
        return await asyncio.to_thread(self._lookup, self.store.get_file, file_id, caller)

    async def file_content(self, caller, file_id: str) -> bytes:
        return await asyncio.to_thread(self._lookup, self.store.file_content, file_id, caller)

    async def list_files(self, caller) -> dict:
        files = await asyncio.to_thread(lambda: [f for f in self.store.list_files()
                                                 if may_see(caller, self.store.tenant("file", f["id"]))])
        return {"object": "list", "data": files, "has_more": False}

    async def delete_file(self, caller, file_id: str) -> dict:
        await asyncio.to_thread(self._lookup, self.store.delete_file, file_id, caller)
        return {"id": file_id, "object": "file", "deleted": True}

    # --- batches -------------------------------------------------------------------

    async def create_batch(self, caller, input_file_id: str, endpoint: str, completion_window: str,
                           metadata: dict | None, key: str | None = None, output_ttl_s: float | None = None) -> dict:
        if endpoint not in ENDPOINTS:
            raise APIError(400, f"unsupported endpoint {endpoint!r}; supported: {sorted(ENDPOINTS)}",
                           param="endpoint")
        if completion_window not in self.settings.completion_windows:
            raise APIError(400, f"completion_window must be one of {self.settings.completion_windows}",
                           param="completion_window")
        meta = await asyncio.to_thread(self._lookup, self.store.get_file, input_file_id, caller)
        if meta["purpose"] != "batch":
            raise APIError(400, f"file {input_file_id} has purpose {meta['purpose']!r}, not 'batch'",
                           param="input_file_id")
        open_batches = sum(1 for job in self.jobs.values() if job.batch["status"] in OPEN_STATUSES)
        tenant = self.config.tenant(caller[0]) if caller is not None else None
        if tenant is not None and tenant.max_batches is not None:
            mine = sum(1 for job in self.jobs.values() if job.batch["status"] in OPEN_STATUSES
                       and self.store.tenant("batch", job.batch["id"]) == tenant.name)
            if mine >= tenant.max_batches:
                raise APIError(429, f"tenant {tenant.name!r} has {mine} batches open (its limit is "
                               f"{tenant.max_batches}); retry when one finishes", "rate_limit_error",
                               code="too_many_batches", headers={"Retry-After": "30"})
        if open_batches >= self.settings.max_open_batches:
            raise APIError(429, f"{open_batches} batches are open (limit {self.settings.max_open_batches}); "
                                "retry when one finishes", "rate_limit_error", code="too_many_batches",
                           headers={"Retry-After": "30"})
        lines = await asyncio.to_thread(lambda: parse_input(self.store.file_content(input_file_id), endpoint))
        if len(lines) > self.settings.max_requests_per_batch:
            raise APIError(400, f"the file has {len(lines)} requests; the limit is "
                                f"{self.settings.max_requests_per_batch}", param="input_file_id")
        now = int(time.time())
        batch = {
            "id": self.store.new_batch_id(), "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": completion_window, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + int(window_seconds(completion_window)), "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": metadata,
            "output_expires_after": None if output_ttl_s is None else {"anchor": "created_at",
                                                                       "seconds": int(output_ttl_s)},
        }
        def save() -> None:
            if key is not None:
                self.store.save_owner(batch["id"], key)
            if caller is not None:
                self.store.save_tenant("batch", batch["id"], caller[0])
            self.store.save_batch(batch)  # accepted = on disk

        await asyncio.to_thread(save)
        self._start(batch)
        return dict(batch)

    async def get_batch(self, caller, batch_id: str) -> dict:
        batch = await asyncio.to_thread(self._lookup, self.store.get_batch, batch_id, caller)
        job = self.jobs.get(batch_id)
        return dict(job.batch) if job else batch

    async def list_batches(self, caller, after: str | None = None, limit: int = 20) -> dict:
        stored = await asyncio.to_thread(lambda: [b for b in self.store.list_batches()
                                                  if may_see(caller, self.store.tenant("batch", b["id"]))])
        batches = [self.jobs[b["id"]].batch if b["id"] in self.jobs else b for b in stored]
        if after:
            ids = [b["id"] for b in batches]
            batches = batches[ids.index(after) + 1:] if after in ids else []
        page = batches[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(batches) > limit}

    async def cancel_batch(self, caller, batch_id: str) -> dict:
        batch = await self.get_batch(caller, batch_id)
        job = self.jobs.get(batch_id)
        if job is None or batch["status"] not in ("validating", "in_progress"):
            if batch["status"] in ("cancelling", "cancelled"):
                return batch
            raise APIError(409, f"batch {batch_id} is {batch['status']} and cannot be cancelled",
                           code="batch_not_cancellable")
        job.cancelled = True
        self._set_status(job, "cancelling")
        for task in list(job.tasks):
            task.cancel()
        return dict(job.batch)

    def __del__(self) -> None:
        """Serve stops this replica (a redeploy, a scale-in): hand back the leases at once, so
        the runner that replaces it resumes the batches without waiting for them to expire."""
        for batch_id in list(getattr(self, "jobs", {})):
            try:
                self.store.release_lease(batch_id, self.owner)
            except Exception:  # noqa: BLE001 - shutting down; the lease expires by itself
                pass

    async def check_health(self) -> None:
        for job in self.jobs.values():
            if job.task is not None and job.task.done() and job.batch["status"] in OPEN_STATUSES:
                raise RuntimeError(f"batch {job.batch['id']} stopped in status {job.batch['status']}")

    # --- expiry -------------------------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reap_interval_s)
            try:
                await self.reap()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                if isinstance(exc, RuntimeError) and "after shutdown" in str(exc):
                    return  # the replica is stopping: its thread pool is gone (no traceback in the log)
                logger.exception("deleting expired batch files failed")

    async def reap(self, now: float | None = None) -> tuple[int, int]:
        """Delete the files past their expires_at (not an open batch's input) and the batches
        finished more than batch.retention_s ago (the disk work in a thread); returns how many
        files and batches were deleted."""
        now = time.time() if now is None else now
        in_use = {job.batch["input_file_id"] for job in self.jobs.values() if job.batch["status"] in OPEN_STATUSES}
        files, batches = await asyncio.to_thread(self._delete_expired, now, in_use)
        for batch_id in batches:
            self.jobs.pop(batch_id, None)
        return files, len(batches)

    def _delete_expired(self, now: float, in_use: set[str]) -> tuple[int, list[str]]:
        files, batches = 0, []
        for meta in self.store.list_files():
            if meta.get("expires_at") is not None and meta["expires_at"] <= now and meta["id"] not in in_use:
                try:
                    self.store.delete_file(meta["id"])
                    files += 1
                except NotFound:  # deleted meanwhile
                    pass
        for batch in self.store.list_batches():
            ended = max((batch.get(f) or 0) for f in ("completed_at", "failed_at", "expired_at", "cancelled_at"))
            if batch["status"] not in OPEN_STATUSES and ended and ended + self.settings.retention_s <= now:
                try:
                    self.store.delete_batch(batch["id"])
                    batches.append(batch["id"])
                except NotFound:
                    pass
        return files, batches

    # --- running --------------------------------------------------------------------

    def _lookup(self, fn, object_id, caller):
        """fn(object_id) for a file or batch the caller may see; else 404, as for none."""
        kind = "file" if fn.__name__ in ("get_file", "file_content", "delete_file") else "batch"
        try:
            if not may_see(caller, self.store.tenant(kind, object_id)):
                raise NotFound(kind, object_id)
            return fn(object_id)
        except NotFound as exc:
            raise APIError(404, str(exc), param="file_id" if exc.kind == "file" else "batch_id",
                           code=f"{exc.kind}_not_found") from None

    def _start(self, batch: dict) -> None:
        job = Job(batch=batch, key=self.store.owner(batch["id"]))
        self.jobs[batch["id"]] = job
        # In a context of its own: not a child of the request that created the batch, which
        # Ray would cancel (with everything it started) if that client disconnected.
        job.task = asyncio.get_running_loop().create_task(self._run(job), context=contextvars.Context())

    def _set_status(self, job: Job, status: str) -> None:
        job.batch["status"] = status
        job.batch[f"{status}_at"] = int(time.time())
        self._save(job)

    def _save(self, job: Job) -> None:
        self.store.save_batch(job.batch)
        job.last_saved = time.monotonic()

    async def _run(self, job: Job) -> None:
        batch = job.batch
        # Only the lease holder runs a batch and writes its log: a runner that Serve starts
        # while the one it replaces still runs waits for the lease, or takes it over once it
        # expires (its holder gone).
        while not self.store.acquire_lease(batch["id"], self.owner, LEASE_TTL_S):
            await asyncio.sleep(LEASE_TTL_S / 3)
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(job, asyncio.current_task()))
        watchdog = asyncio.get_running_loop().create_task(self._expire_at_deadline(job))
        try:
            if batch["status"] in ("validating", "in_progress") and not job.expired:
                await self._run_lines(job)
            watchdog.cancel()
            await self._finalize(job)
        except asyncio.CancelledError:
            raise  # the replica is shutting down: the batch resumes on the next start
        except Exception as exc:  # noqa: BLE001 - the batch fails, the service goes on
            logger.exception("batch %s failed", batch["id"])
            batch["errors"] = {"object": "list", "data": [{"code": "internal_error", "message": str(exc),
                                                          "param": None, "line": None}]}
            self._set_status(job, "failed")
        finally:
            watchdog.cancel()
            keeper.cancel()
            self.store.release_lease(batch["id"], self.owner)

    async def _keep_lease(self, job: Job, runner: asyncio.Task) -> None:
        """Renew the lease while the batch runs; one lost (this runner stalled past its expiry
        and another took over) stops this runner's work on the batch at once."""
        while True:
            await asyncio.sleep(LEASE_TTL_S / 3)
            if not self.store.acquire_lease(job.batch["id"], self.owner, LEASE_TTL_S):
                logger.error("batch %s: lost its lease to another runner; stopping here", job.batch["id"])
                for task in list(job.tasks):
                    task.cancel()
                runner.cancel()
                return

    async def _expire_at_deadline(self, job: Job) -> None:
        """completion_window, as OpenAI enforces it: when it ends, the lines still running
        are stopped and the batch finalizes as `expired` (done lines in the output file,
        the others in the error file with code batch_expired)."""
        expires_at = job.batch.get("expires_at")
        if expires_at is None or job.batch["status"] not in ("validating", "in_progress"):
            return
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        if job.batch["status"] in ("validating", "in_progress") and not job.cancelled:
            logger.warning("batch %s: its completion window ended; expiring it", job.batch["id"])
            job.expired = True
            for task in list(job.tasks):
                task.cancel()

    async def _run_lines(self, job: Job) -> None:
        batch = job.batch
        # Off the event loop: an input file may be 64 MiB of JSON lines.
        lines = await asyncio.to_thread(lambda: parse_input(self.store.file_content(batch["input_file_id"]),
                                                            batch["endpoint"]))
        results = await asyncio.to_thread(self.store.read_results, batch["id"])
        done = {tuple(r["key"]) for r in results}
        _count(batch, results)
        batch["request_counts"]["total"] = len(lines)
        if batch["status"] == "validating":
            self._set_status(job, "in_progress")
        log = self.store.open_results(batch["id"])
        try:
            for line in lines:
                if job.cancelled or job.expired:
                    break
                if line.key in done:
                    continue
                if line.error is not None:
                    self._record(job, log, line, None, line.error)
                    continue
                await self.slots.acquire()
                if job.cancelled or job.expired:
                    self.slots.release()
                    break
                task = asyncio.get_running_loop().create_task(self._run_line(job, log, line))
                job.tasks.add(task)
                task.add_done_callback(job.tasks.discard)
                # Released however the task ends: also when a cancel reaches it before it
                # started (then none of its own code, a finally included, ever runs).
                task.add_done_callback(lambda _: self.slots.release())
            while job.tasks:
                await asyncio.gather(*list(job.tasks), return_exceptions=True)
        finally:
            log.close()

    async def _run_line(self, job: Job, log, line: InputLine) -> None:
        delay = 0.5
        for attempt in range(1, self.settings.max_retries + 2):
            try:
                response = await answer_line(self.serving, job.batch["endpoint"], line.body, job.key)
            except APIError as exc:
                if attempt <= self.settings.max_retries:
                    logger.warning("batch %s line %d: %s; retrying", job.batch["id"], line.line_no, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10)
                    continue
                response = (exc.status, exc.body())
            self._record(job, log, line, response, None)
            return

    def _record(self, job: Job, log, line: InputLine, response: tuple[int, dict] | None,
                error: dict | None) -> None:
        """Append one line's result and count it."""
        record = result_record(line.custom_id, response, error)
        kind = record_kind(record)
        log.append({"key": list(line.key), "line": line.line_no, "kind": kind, "record": record})
        job.batch["request_counts"]["completed" if kind == "output" else "failed"] += 1
        if time.monotonic() - job.last_saved > 1.0:
            self._save(job)  # counts on disk are a hint; the log is the truth

    async def _finalize(self, job: Job) -> None:
        batch = job.batch
        cancelled = job.cancelled or batch["status"] == "cancelling"
        if batch["status"] != "cancelling":
            self._set_status(job, "finalizing")  # from here on, a cancel returns the batch as it is

        def read() -> tuple[list[dict], list]:  # off the event loop: the whole input and results
            return (_unique(sorted(self.store.read_results(batch["id"]), key=lambda r: r["line"])),
                    parse_input(self.store.file_content(batch["input_file_id"]), batch["endpoint"]))

        results, lines = await asyncio.to_thread(read)
        done = {tuple(r["key"]) for r in results}
        undone = [line for line in lines if line.key not in done]
        # Lines left when the window ended (here, or before a restart): the batch expired.
        expired = bool(not cancelled and undone and (job.expired or time.time() >= (batch.get("expires_at") or 1e18)))
        outputs = [r["record"] for r in results if r["kind"] == "output"]
        errors = [r["record"] for r in results if r["kind"] == "error"]
        if expired:  # the lines not done: in the error file, as OpenAI reports them
            errors += [result_record(line.custom_id, None, {
                "code": "batch_expired", "message": "This request could not be executed before the completion "
                                                    "window expired."}) for line in undone]
        _count(batch, results)
        if expired:
            batch["request_counts"]["failed"] += len(undone)
        for role, records, key in (("output", outputs, "output_file_id"), ("error", errors, "error_file_id")):
            if records:
                file_id = derived_file_id(batch["id"], role)
                expiry = batch.get("output_expires_after")

                def write(records=records, role=role, file_id=file_id, expiry=expiry) -> None:
                    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
                    self.store.create_file(data, f"{batch['id']}_{role}.jsonl", f"batch_{role}", file_id=file_id,
                                           tenant=self.store.tenant("batch", batch["id"]),  # the batch's tenant's
                                           ttl_s=expiry["seconds"] if expiry else self.settings.output_ttl_s)

                await asyncio.to_thread(write)
                batch[key] = file_id
        self._set_status(job, "cancelled" if cancelled else "expired" if expired else "completed")
