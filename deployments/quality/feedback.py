"""Users' feedback on answers, kept durably and joined with what was asked and answered.

Two append-only JSONL files under `quality.feedback.storage_dir` (shared by every ingress
replica, like the batch lane's files):

- `responses.jsonl`: one line per answer served: its id, model, experiment and arm, and
  (only when `store_outputs` is on) its prompt and output. Lines older than
  `retention_s` are dropped when the ingress starts and every retention_s / 24 after; when
  the file passes `max_log_bytes` the oldest go too, down to half of it, taken from the
  tenants that hold the most: each keeps its newest lines up to one level, the highest
  that fits, so a tenant below it loses none (an answer dropped can no longer be rated:
  404, as past the retention). At most `max_responses` are kept in memory to join feedback
  with, the tenant holding the most giving up its oldest first.
- `feedback.jsonl`: one line per rating (fsynced before the rating is acknowledged): the
  response's id, model, experiment and arm, the score (a number; thumbs up = 1, down = 0),
  an optional label and comment. Kept to the same retention and byte bound as the
  answers, the same way (the rating tenant's lines).

`export(since)` yields the ratings since a time, each with the prompt and output of its
response when they were kept (a fine-tuning set); `summary()` gives each (model,
experiment, arm)'s score sum and count, read from the file, so the metrics survive
restarts (they cover the ratings the file keeps: those within the retention).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from deployments.config import may_see


class UnknownResponseError(LookupError):
    """The rated response is not known (never served here, or past the retention)."""


class RatingLimitError(Exception):
    """The response has as many ratings as one response may have."""


class FeedbackStore:
    def __init__(self, storage_dir: str, store_outputs: bool, retention_s: float, max_responses: int,
                 max_log_bytes: int = 256 * 2**20, max_ratings_per_response: int = 16) -> None:
        self.dir = Path(storage_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store_outputs, self.retention_s, self.max_responses = store_outputs, retention_s, max_responses
        self.max_log_bytes, self.max_ratings = max_log_bytes, max_ratings_per_response
        self._ratings: dict[str, int] = {}  # ratings per response id, read with the summary
        self._adding = threading.Lock()  # a rating's count check and its append, one at a time here
        self.responses_file, self.feedback_file = self.dir / "responses.jsonl", self.dir / "feedback.jsonl"
        self._lock = threading.Lock()
        self._responses: dict[str, dict] = {}
        self._by_tenant: dict[str | None, OrderedDict[str, None]] = {}  # each tenant's ids, oldest first
        # summary(): the ratings counted so far, how far into the file they go, and which file
        # (a compaction replaces it: counted afresh).
        self._totals: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._summary_offset, self._summary_inode = 0, None
        self._compacted_at: dict[Path, float] = {}  # when each log was last compacted (time.monotonic())
        self._load_responses()
        self._compact(self.feedback_file)

    def _load_responses(self) -> None:
        for record in self._compact(self.responses_file):
            self._remember(record)
        # What other replicas append after this is read on a miss (from the start of a file
        # that a compaction replaced).
        self._read_to, self._inode = _size(self.responses_file), _inode(self.responses_file)

    def _compact(self, path: Path) -> list[dict]:
        """Keep a log's lines within the retention and, when the file has passed max_log_bytes,
        within half of it, each tenant its newest up to a level that the biggest share only
        meets (fair_level); the file is rewritten without the others (prompts, outputs and
        comments must not outlive it). Returns what is kept."""
        horizon = time.time() - self.retention_s
        with _locked(self.dir):
            read = list(_read_lines(path))
            lines = [(line, record) for line, record in read if record.get("created", 0) >= horizon]
            sizes: dict[str | None, int] = {}
            for line, record in lines:
                sizes[record.get("tenant")] = sizes.get(record.get("tenant"), 0) + len(line)
            level = fair_level(sizes, self.max_log_bytes // 2) if sum(sizes.values()) > self.max_log_bytes \
                else None
            kept, taken = [], dict.fromkeys(sizes, 0)
            for line, record in reversed(lines):  # newest first
                tenant = record.get("tenant")
                taken[tenant] += len(line)
                if level is None or taken[tenant] <= level:
                    kept.append((line, record))
            kept.reverse()
            if len(kept) < len(read):
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(b"".join(line for line, _ in kept))
                os.replace(tmp, path)
        self._compacted_at[path] = time.monotonic()
        return [record for _, record in kept]

    def _bounded_append(self, path: Path, record: dict, sync: bool) -> None:
        """Append a line to a log; compact it when it has passed its bound or the retention's
        period (runs where the append runs: off the event loop)."""
        _append(path, record, sync)
        if _size(path) > self.max_log_bytes or time.monotonic() - self._compacted_at[path] > self.retention_s / 24:
            self._compact(path)

    def _remember(self, record: dict) -> None:
        self._forget(record["id"])
        self._responses[record["id"]] = record
        self._by_tenant.setdefault(record.get("tenant"), OrderedDict())[record["id"]] = None
        while len(self._responses) > self.max_responses:  # the biggest holder's oldest goes
            self._forget(next(iter(max(self._by_tenant.values(), key=len))))

    def _forget(self, response_id: str) -> None:
        record = self._responses.pop(response_id, None)
        if record is not None:
            ids = self._by_tenant[record.get("tenant")]
            del ids[response_id]
            if not ids:
                del self._by_tenant[record.get("tenant")]

    def record_response(self, response_id: str, model: str, experiment: str | None, arm: str | None,
                        prompt=None, output: str | None = None, tenant: str | None = None) -> Callable[[], None]:
        """Remember an answer for rating (at once, in memory); returns the file append that
        lets other ingress replicas find it too, for the caller to run off its event loop.
        tenant: whose answer it is (only they, and admins, may rate it)."""
        record = {"id": response_id, "created": time.time(), "model": model, "experiment": experiment, "arm": arm,
                  "tenant": tenant}
        if self.store_outputs:
            record.update(prompt=prompt, output=output)
        with self._lock:
            self._remember(record)
        return functools.partial(self._bounded_append, self.responses_file, record, False)

    def response(self, response_id: str) -> dict | None:
        """An answer kept for rating: from memory, where the lines other ingress replicas
        appended to the shared file since the last look are read first (only those: an unknown
        id costs no scan of the file)."""
        with self._lock:
            record = self._responses.get(response_id)
            if record is None:
                self._catch_up()
                record = self._responses.get(response_id)
        if record is not None and record.get("created", 0) < time.time() - self.retention_s:
            record = None
        return record

    def _catch_up(self) -> None:
        size, inode = _size(self.responses_file), _inode(self.responses_file)
        if inode != self._inode or size < self._read_to:  # rewritten (a compaction): read it again
            self._read_to, self._inode = 0, inode
        if size == self._read_to:
            return
        with open(self.responses_file, "rb") as f:
            f.seek(self._read_to)
            data = f.read(size - self._read_to)
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next look
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash mid-write
            if record.get("id") not in self._responses:
                self._remember(record)
        self._read_to += len(complete)

    def add(self, response_id: str, score: float, label: str | None, comment: str | None,
            caller: tuple[str, bool] | None = None) -> dict:
        """A rating of an answer the caller may see (config.may_see: its tenant's)."""
        response = self.response(response_id)
        if response is None or not may_see(caller, response.get("tenant")):
            raise UnknownResponseError(f"no response {response_id!r} is known (unknown id, or older than the "
                                       "feedback retention)")
        record = {"id": f"fb-{os.urandom(8).hex()}", "created": time.time(), "response_id": response_id,
                  "model": response["model"], "experiment": response.get("experiment"), "arm": response.get("arm"),
                  "score": float(score), "label": label, "comment": comment,
                  "tenant": None if caller is None else caller[0]}
        with self._adding:  # (other replicas' ratings count once their lines are read: a bound per replica)
            self.summary()  # the ratings every replica appended so far
            if self._ratings.get(response_id, 0) >= self.max_ratings:
                raise RatingLimitError(f"response {response_id!r} has {self.max_ratings} ratings, as many as one "
                                       "response may have (quality.feedback.max_ratings_per_response)")
            self._bounded_append(self.feedback_file, record, sync=True)  # counted by the next summary()
        return record

    def export(self, since: float = 0.0):
        """Ratings created at or after `since`, with their response's prompt and output if kept."""
        for record in _read(self.feedback_file):
            if record.get("created", 0) < since:
                continue
            response = self.response(record["response_id"]) if self.store_outputs else None
            if response is not None and "output" in response:
                record = {**record, "prompt": response.get("prompt"), "output": response.get("output")}
            yield record

    def summary(self) -> dict[tuple[str, str, str], tuple[float, int]]:
        """Score sum and count per (model, experiment, arm) of every rating in the file: those
        of earlier runs and of other ingress replicas too. Only lines appended since the last
        call are read (a line still being written is read the next time)."""
        with self._lock:
            try:
                with open(self.feedback_file, "rb") as f:
                    inode = os.fstat(f.fileno()).st_ino
                    if inode != self._summary_inode:  # a compaction's new file: count it afresh
                        self._totals, self._ratings = {}, {}
                        self._summary_offset, self._summary_inode = 0, inode
                    f.seek(self._summary_offset)
                    data = f.read()
            except FileNotFoundError:
                return dict(self._totals)
            end = data.rfind(b"\n") + 1
            self._summary_offset += end
            for line in data[:end].splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash mid-write
                key = (record["model"], record.get("experiment") or "", record.get("arm") or "")
                total, count = self._totals.get(key, (0.0, 0))
                self._totals[key] = (total + record["score"], count + 1)
                self._ratings[record["response_id"]] = self._ratings.get(record["response_id"], 0) + 1
            return dict(self._totals)


def fair_level(sizes: dict, budget: int) -> int:
    """The highest level L such that every holder keeping min(its size, L) keeps at most
    `budget` in all (max-min fairness: holders below L keep everything)."""
    remaining, left = budget, len(sizes)
    for size in sorted(sizes.values()):
        if size * left > remaining:
            return remaining // left
        remaining -= size
        left -= 1
    return max(sizes.values(), default=0)


class _locked:
    """The folder's lock file, held exclusively (appends against the retention's rewrite)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # releases the lock


def _append(path: Path, record: dict, sync: bool) -> None:
    """One line, written with one write() on an O_APPEND descriptor, under the folder's lock."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    with _locked(path.parent):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_lines(path: Path):
    """(line as bytes, its record) for each whole, readable line."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    continue  # still being written (or cut by a crash)
                try:
                    yield line, json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash mid-write
    except FileNotFoundError:
        return


def _read(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash mid-write
    except FileNotFoundError:
        return
