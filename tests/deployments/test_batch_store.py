"""The batch lane's durable store: crash leftovers, torn log lines, ids that name no path."""

from __future__ import annotations

import pathlib

import pytest

from deployments.batch.runner import parse_input
from deployments.batch.store import BatchStore, NotFound
from deployments.api.errors import APIError


def test_torn_last_log_line_is_cut_and_appends_continue(tmp_path):
    store = BatchStore(tmp_path)
    batch_id = store.new_batch_id()
    log = store.open_results(batch_id)
    log.append({"key": ["id", "a"], "kind": "output"})
    log.close()
    with open(tmp_path / "batches" / f"{batch_id}.log", "ab") as f:
        f.write(b'{"key": ["id", "b"], "ki')  # a crash mid-append
    assert [r["key"] for r in store.read_results(batch_id)] == [["id", "a"]]
    log = store.open_results(batch_id)
    log.append({"key": ["id", "b"], "kind": "output"})
    log.close()
    assert [r["key"] for r in store.read_results(batch_id)] == [["id", "a"], ["id", "b"]]


def test_leftover_temporary_files_are_removed_and_files_round_trip(tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / ".file-x.json.123.tmp").write_text("half")
    store = BatchStore(tmp_path)
    assert not list((tmp_path / "files").glob(".*.tmp"))
    meta = store.create_file(b'{"a": 1}\n', "in.jsonl", "batch")
    assert store.get_file(meta["id"]) == meta and store.file_content(meta["id"]) == b'{"a": 1}\n'
    store.delete_file(meta["id"])
    with pytest.raises(NotFound):
        store.get_file(meta["id"])


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "file-../../x", "file-" + "0" * 31 + "/", "", "batch_1"])
def test_ids_that_are_not_generated_ones_name_no_path(tmp_path, bad_id):
    store = BatchStore(tmp_path)
    with pytest.raises(NotFound):
        store.get_file(bad_id)
    with pytest.raises(NotFound):
        store.get_batch(bad_id)


def test_parse_input_marks_bad_lines_and_refuses_files_that_are_not_jsonl():
    good = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}'
    lines = parse_input(good + b"\n\n[1, 2]\n{oops\n", "/v1/completions")
    assert [(line.key, line.error and line.error["code"]) for line in lines] == [
        (("id", "a"), None), (("line", 3), "missing_custom_id"), (("line", 4), "invalid_json_line")]
    with pytest.raises(APIError, match="not JSONL"):
        parse_input(b"a,b\n1,2\n", "/v1/completions")
    with pytest.raises(APIError, match="not UTF-8"):
        parse_input(b"\xff\xfe\n", "/v1/completions")


def test_a_batch_lease_has_one_holder_until_it_expires(tmp_path):
    """Two runners on the same storage: the second cannot take a batch the first holds, can
    once the first releases it or its lease expires (its holder gone), and a renewal by the
    holder keeps it."""
    import time

    from deployments.batch.store import BatchStore

    first, second = BatchStore(tmp_path), BatchStore(tmp_path)  # two processes' views
    batch_id = first.new_batch_id()
    assert first.acquire_lease(batch_id, "runner-a", ttl_s=0.3)
    assert not second.acquire_lease(batch_id, "runner-b", ttl_s=0.3)
    assert first.acquire_lease(batch_id, "runner-a", ttl_s=0.3)  # renewed
    first.release_lease(batch_id, "runner-b")  # not its lease: no effect
    assert not second.acquire_lease(batch_id, "runner-b", ttl_s=0.3)
    first.release_lease(batch_id, "runner-a")
    assert second.acquire_lease(batch_id, "runner-b", ttl_s=0.3)
    time.sleep(0.4)  # runner-b went away without releasing: its lease expires
    assert first.acquire_lease(batch_id, "runner-a", ttl_s=0.3)



def test_listing_skips_what_is_deleted_while_it_lists(tmp_path, monkeypatch):
    """A file or batch deleted (or expired) between the directory listing and the read of its
    record is left out of the list, not a 500 for the caller who listed."""
    store = BatchStore(tmp_path)
    kept, gone = (store.create_file(b'{"a": 1}\n', f"{name}.jsonl", "batch") for name in ("kept", "gone"))
    batch = {"id": store.new_batch_id(), "created_at": 1}
    store.save_batch(batch)
    # The folders as they were listed before the deletions.
    stale = {store.files: list(store.files.glob("file-*.json")), store.batches: list(store.batches.glob("batch_*.json"))}
    store.delete_file(gone["id"])
    store.delete_batch(batch["id"])
    glob = pathlib.Path.glob
    monkeypatch.setattr(pathlib.Path, "glob", lambda self, pattern: iter(stale[self]) if self in stale
                        else glob(self, pattern))
    assert [m["id"] for m in store.list_files()] == [kept["id"]]
    assert store.list_batches() == []
