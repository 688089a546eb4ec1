"""The router actor's bounded stores (stored responses, result cache), alone."""

from __future__ import annotations

import time

from cluster.router import BoundedStore


def test_a_group_over_its_bounds_pushes_out_only_its_own_least_recent():
    store = BoundedStore()
    store.put("b1", b"x" * 10, max_entries=3, max_bytes=100, group="b")
    for i in range(5):
        store.put(f"a{i}", b"y" * 40, max_entries=3, max_bytes=100, group="a")
    # a's bytes bound (100) keeps its last two; b's one answer is still there.
    assert [k for k in ("a0", "a1", "a2", "a3", "a4") if store.get(k, 60)] == ["a3", "a4"]
    assert store.get("b1", 60) == b"x" * 10 and store.group_of("b1") == "b"
    assert len(store) == 3 and store.num_bytes == 90
    # Count bound, least recently used first: reading a3 keeps it over a4.
    store.get("a3", 60)
    store.put("a5", b"z", max_entries=2, max_bytes=100, group="a")
    assert store.get("a4", 60) is None and store.get("a3", 60) and store.get("a5", 60)
    assert store.get("b1", 60)


def test_values_expire_and_deletes_free_their_bytes():
    store = BoundedStore()
    assert store.put("k", b"abc", 4, 10) and store.group_of("k") is None
    assert not store.put("big", b"x" * 11, 4, 10)  # over the bound alone: nothing kept
    time.sleep(0.02)
    assert store.get("k", 0.01) is None and len(store) == 0 and store.num_bytes == 0
    store.put("k", b"abc", 4, 10, group="t")
    store.put("k", b"abcd", 4, 10, group="t")  # replaced, not counted twice
    assert store.num_bytes == 4 and store.delete("k") and not store.delete("k")
    assert store.num_bytes == 0 and len(store) == 0
    assert store.put("k", b"abc", 0, 10, group="t") and store.get("k", 60) is None  # a bound of 0 keeps none
    assert len(store) == 0 and store.num_bytes == 0
