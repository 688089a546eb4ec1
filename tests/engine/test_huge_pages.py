"""Weights and KV cache on 2 MiB pages (engine/huge_pages.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import SamplingParams, huge_pages
from engine.models.linear import OneDNNLinear, onednn_available

pytestmark = pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages here")


def _vma_flags(address: int) -> dict[str, str]:
    """/proc/self/smaps' fields for the mapping that holds `address`."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
                start, end = (int(x, 16) for x in head.split("-"))
                if inside:
                    break
                inside = start <= address < end
            elif inside:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    return fields


class _Tied(nn.Module):
    """An embedding and a head sharing one weight, a buffer, and a plain tensor attribute
    that aliases another module's buffer (as Int8Embedding.packed aliases its head's)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 64)
        self.proj = nn.Linear(64, 64)
        self.head = nn.Linear(64, 300, bias=False)
        self.head.weight = self.embed.weight
        self.proj.register_buffer("table", torch.randn(1000, 33))
        self.embed.alias = self.proj.table


def test_placing_a_model_keeps_its_values_ties_and_aliases_in_one_arena():
    model = _Tied()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    distinct = {t.data_ptr(): t.nbytes for t in model.state_dict().values()}  # the tied weight once
    placed = huge_pages.place_model(model)
    assert placed == sum(-(-n // huge_pages.ALIGN) * huge_pages.ALIGN for n in distinct.values())
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert model.head.weight is model.embed.weight
    assert model.embed.alias.data_ptr() == model.proj.table.data_ptr()
    # First seen first, one after another, the first on a 2 MiB boundary (the embedding's
    # attribute brings the table in before proj's own parameters).
    addresses = [model.embed.weight.data_ptr(), model.proj.table.data_ptr(), model.proj.weight.data_ptr(),
                 model.proj.bias.data_ptr()]
    assert addresses[0] % huge_pages.HUGE_PAGE == 0
    assert addresses == sorted(addresses) and addresses[-1] - addresses[0] < placed
    assert all(a % huge_pages.ALIGN == 0 for a in addresses)
    assert _vma_flags(addresses[0]).get("THPeligible") == "1"  # the kernel took the madvise
    # Still a working module: gradients and in-place writes land in the arena.
    model.proj.weight.data.add_(1.0)
    assert torch.equal(model.proj.weight, before["proj.weight"] + 1.0)


@pytest.mark.skipif(not onednn_available(), reason="oneDNN is not available")
def test_onednn_prepacked_weights_keep_their_own_memory():
    layer = OneDNNLinear(nn.Linear(64, 32))
    packed = layer.packed_weight
    x = torch.randn(3, 64)
    expected = layer(x)
    huge_pages.place_model(layer)
    assert layer.packed_weight is packed  # torch._mkldnn layout: not movable, left as it was
    assert torch.equal(layer(x), expected)


def test_the_kv_cache_is_one_huge_page_arena(llm):
    caches = [t for pair in llm.engine.runner.kv_caches for t in pair]
    assert caches[0].data_ptr() % huge_pages.HUGE_PAGE == 0
    step = caches[0].nbytes
    assert all(b.data_ptr() - a.data_ptr() == step for a, b in zip(caches, caches[1:]))
    assert _vma_flags(caches[0].data_ptr()).get("THPeligible") == "1"


def test_huge_pages_off_decodes_the_same_tokens(llm, make_llm):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["The capital of France is", "def add(a, b):"]
    off = make_llm(cpu_huge_pages=False)
    # Each of its caches its own allocation (torch.zeros), where the default's share an arena.
    # (Not checked through smaps' THPeligible: in one full-suite run a torch.zeros block was
    # marked eligible too, by something else in the process.)
    on_cache, off_cache = llm.engine.runner.kv_caches[0][0], off.engine.runner.kv_caches[0][0]
    assert off_cache.untyped_storage().nbytes() == off_cache.nbytes
    assert on_cache.untyped_storage().nbytes() >= 2 * len(llm.engine.runner.kv_caches) * on_cache.nbytes
    assert [o.token_ids for o in off.generate(prompts, params)] == \
        [o.token_ids for o in llm.generate(prompts, params)]
