"""LoRA adapters served beside their base model, many in one step (multi-LoRA).

An adapter is a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) whose
low-rank pairs (A: [r, in], B: [out, r]) add `scaling * B @ A @ x` to some of the base
model's projections. Nothing is merged into the base weights: each wrapped projection
(`LoRALinear`) keeps the adapters of up to `max_loras` *slots*, and every step tells it
which rows of its input belong to which slot: a long run of one adapter's rows gets that
adapter's pair, short runs of several adapters share the resident slots' pairs stacked
and masked per row, so requests for different adapters and for the base share one forward.

Three tiers, as vLLM has them: registered adapters (a name and a folder), adapters kept
parsed in host memory (`max_cpu_loras`, least recently used evicted; read again from their
folder when needed) and adapters resident in the model's slots (`max_loras`; a slot is
reused, least recently used first, only when no running request reads it). The scheduler
admits a request only once its adapter has a slot (`LoRAManager.acquire`).

Under tensor parallelism each rank keeps its share of every pair (the rows of B for its
heads or intermediate columns, the columns of A for its slice of o/down's input), found
from the same weight map that slices the base weights; pipeline stages keep their layers'.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.models.base import TensorSlice

# Our fused projections and the checkpoint modules a LoRA pair may target in them.
LORA_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[\w-]+)?\.weight$")


class LoRAError(ValueError):
    """An adapter cannot be loaded or served (bad folder, unsupported setting, unknown name)."""


_ids = itertools.count(1)


@dataclass(frozen=True)
class LoRAHandle:
    """An adapter as a request names it: its name, folder and registered version."""

    name: str
    path: str
    uid: int

    @property
    def cache_salt(self) -> bytes:
        return f"lora:{self.uid}:".encode()


@dataclass
class LoRAAdapter:
    """A parsed adapter: per checkpoint module (e.g. "model.layers.3.self_attn.q_proj"),
    A [r, in] and B [out, r] with the scaling folded into B, float32 on the host."""

    name: str
    path: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # Unique per load: salts the prefix cache, so KV blocks computed under one adapter (or an
    # older version of it) never serve another.
    uid: int = field(default_factory=lambda: next(_ids))


def load_adapter(name: str, path: str | Path, max_rank: int) -> LoRAAdapter:
    """Read a PEFT LoRA folder; LoRAError names what is missing or unsupported."""
    folder = Path(path).expanduser()
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise LoRAError(f"LoRA adapter {name!r}: {folder} has no adapter_config.json")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise LoRAError(f"LoRA adapter {name!r}: cannot read {config_file}: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"adapter {name!r} is a {config.get('peft_type')} adapter; semline serves LoRA adapters")
    for key, ok in (("use_dora", not config.get("use_dora")), ("bias", config.get("bias", "none") == "none"),
                    ("modules_to_save", not config.get("modules_to_save")),
                    ("alpha_pattern", not config.get("alpha_pattern"))):
        if not ok:
            raise LoRAError(f"LoRA adapter {name!r}: {key}={config.get(key)!r} is not supported")
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise LoRAError(f"LoRA adapter {name!r}: {folder} has no adapter_model.safetensors")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise LoRAError(f"LoRA adapter {name!r}: cannot read {weights_file}: {exc}") from exc
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise LoRAError(f"LoRA adapter {name!r}: unsupported tensor {key!r} (only lora_A/lora_B pairs)")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))
    weights, rank = {}, 0
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise LoRAError(f"LoRA adapter {name!r}: {module} lacks its lora_{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"].float(), pair["B"].float()
        r = a.shape[0]
        if b.shape[1] != r:
            raise LoRAError(f"LoRA adapter {name!r}: {module}'s A and B disagree on the rank")
        if r > max_rank:
            raise LoRAError(f"LoRA adapter {name!r} has rank {r}; this server takes at most max_lora_rank={max_rank}")
        scaling = alpha / (r ** 0.5 if rslora else r)
        weights[module] = (a.contiguous(), (b * scaling).contiguous())
        rank = max(rank, r)
    if not weights:
        raise LoRAError(f"LoRA adapter {name!r} has no lora_A/lora_B weights")
    return LoRAAdapter(name, str(folder), rank, weights)


# --- in the model ----------------------------------------------------------------

# A run of at least this many tokens of one adapter (a prefill chunk) gets that adapter's
# own pair on its rows; shorter runs (decode tokens, mixed across adapters) share the
# stacked pairs, whose work grows with the number of resident slots, not with the mix.
MIN_OWN_RUN = 16


class LoRAStep:
    """One step's tokens cut into segments of contiguous rows: ("own", slot, rows) for a run of
    one adapter's tokens, ("mixed", rows, token_slots) for short runs of several adapters
    (and base tokens between them; token_slots [len] is each row's slot, -1 the base model).
    Rows of the base model outside any segment get nothing added."""

    def __init__(self, ranges: list[tuple[int, int, int]], device: torch.device) -> None:
        runs: list[list[int]] = []  # [start, end, slot], adjacent runs of one slot merged
        for start, end, slot in sorted(ranges):
            if runs and runs[-1][1] == start and runs[-1][2] == slot:
                runs[-1][1] = end
            else:
                runs.append([start, end, slot])
        self.segments: list[tuple] = []
        short: list[list[int]] = []

        def close() -> None:
            if len(short) == 1:  # one adapter alone in its stretch: its own pair is cheaper
                self.segments.append(("own", short[0][2], slice(short[0][0], short[0][1])))
            elif short:
                first = short[0][0]
                slots = [-1] * (short[-1][1] - first)
                for start, end, slot in short:
                    slots[start - first:end - first] = [slot] * (end - start)
                self.segments.append(("mixed", slice(first, short[-1][1]),
                                      torch.tensor(slots, dtype=torch.long, device=device)))
            short.clear()

        for run in runs:
            if run[1] - run[0] >= MIN_OWN_RUN:
                close()
                self.segments.append(("own", run[2], slice(run[0], run[1])))
            else:
                short.append(run)
        close()
        self._masks: dict[tuple, torch.Tensor] = {}

    def mask(self, index: int, layout: tuple, columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[rows, C] for mixed segment `index`: 1 where row r's slot owns column c of a stacked
        LoRA matrix (the same for every projection with that column layout: built once a step)."""
        key = (index, layout)
        mask = self._masks.get(key)
        if mask is None:
            token_slots = self.segments[index][2]
            mask = self._masks[key] = (token_slots[:, None] == columns[None, :]).to(dtype)
        return mask


class LoRAState:
    """The current step's LoRAStep (or None: base only), shared by every LoRALinear of a runner;
    `prepack`: the runner runs its linear layers through oneDNN, so the stacked pairs go there too."""

    def __init__(self, prepack: bool = False) -> None:
        self.step: LoRAStep | None = None
        self.prepack = prepack


class LoRALinear(nn.Module):
    """A projection plus the LoRA pairs of the adapters in its slots. `parts`: the checkpoint
    parts the base weight is made of, each with the rows [start, stop) it fills in our output
    (q, k, v of a fused qkv_proj; this rank's slices under tensor parallelism).

    A run of one adapter's tokens (a prefill chunk, a single stream) gets that slot's pair on
    its rows. Short runs of several adapters (decode tokens) share the slots' stacked pairs
    (A: [C, in], B: [out, C], C the columns of every resident slot), each token keeping only
    its slot's columns: three matmul-sized ops per projection whatever the mix, where a
    gathered pair per slot costs a dozen small ones (measured: 4 adapters mixed, 0.62x of
    the base's tokens/s gathered per slot on 2 CPU cores; benchmarks/lora.py). The stacked
    pairs' work grows with the resident slots, so long runs do not go through them."""

    def __init__(self, base: nn.Module, parts: list[tuple[object, int, int]], state: LoRAState) -> None:
        super().__init__()
        self.base = base
        self.parts = parts
        self.state = state
        self.out_features = parts[-1][2]
        # slot -> (A: [R, in], B: [out, R]) over the adapter's targeted parts (B block-diagonal).
        self.slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        step = self.state.step
        if step is None or not self.slots:
            return y
        for index, segment in enumerate(step.segments):
            if segment[0] == "own":
                pair = self.slots.get(segment[1])
                if pair is not None:
                    rows = segment[2]
                    y[rows] += (x[rows] @ pair[0].t()) @ pair[1].t()
            else:
                a, b, columns, layout = self._stacked
                rows = segment[1]
                y[rows] += b(a(x[rows]) * step.mask(index, layout, columns, x.dtype))
        return y

    def set_slot(self, slot: int, adapter: LoRAAdapter | None, dtype: torch.dtype, device: torch.device) -> None:
        self.slots.pop(slot, None)
        if adapter is not None:
            a_parts, b_parts = [], []
            for part, start, stop in self.parts:
                name = part if isinstance(part, str) else part.name
                pair = adapter.weights.get(name.removesuffix(".weight"))
                if pair is None:
                    continue
                a, b = pair
                if isinstance(part, TensorSlice):
                    if part.dim == 0:
                        b = b[part.start:part.stop]
                    else:
                        a = a[:, part.start:part.stop]
                if b.shape[0] != stop - start:
                    raise LoRAError(f"LoRA adapter {adapter.name!r}: {name} has {b.shape[0]} output rows, "
                                    f"the model's has {stop - start}")
                full = torch.zeros(self.out_features, b.shape[1])
                full[start:stop] = b
                a_parts.append(a)
                b_parts.append(full)
            if a_parts:
                self.slots[slot] = (torch.cat(a_parts).to(device, dtype),
                                    torch.cat(b_parts, dim=1).to(device, dtype))
        self._stacked = None
        if self.slots:
            order = sorted(self.slots)
            layout = tuple((s, self.slots[s][0].shape[0]) for s in order)
            columns = torch.tensor([s for s, rank in layout for _ in range(rank)], dtype=torch.long,
                                   device=device)
            prepack = self.state.prepack
            self._stacked = (_linear(torch.cat([self.slots[s][0] for s in order]), prepack),
                             _linear(torch.cat([self.slots[s][1] for s in order], dim=1), prepack), columns, layout)


def _linear(weight: torch.Tensor, prepack: bool) -> nn.Module:
    """x @ weight.T, prepacked for oneDNN (engine/models/linear.py) when the runner uses it."""
    from engine.models.linear import OneDNNLinear

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return OneDNNLinear(linear) if prepack else linear


def wrap_lora_projections(model: nn.Module, weight_map: dict, state: LoRAState) -> None:
    """Put every LoRA-capable projection of a CausalLM (or a stage of one) in a LoRALinear."""
    for index, layer in enumerate(model.layers):
        for path in LORA_PROJECTIONS:
            owner_name, attr = path.split(".")
            owner = getattr(layer, owner_name)
            parts = weight_map.get(f"layers.{index}.{path}.weight")
            if parts is None or not hasattr(owner, attr) or isinstance(parts[0], list):
                continue  # an MoE layer's experts take no adapters
            rows = _part_rows(owner, attr, parts, model.args.hidden_size)
            spans, start = [], 0
            for part, size in zip(parts, rows):
                spans.append((part, start, start + size))
                start += size
            setattr(owner, attr, LoRALinear(getattr(owner, attr), spans, state))


def _part_rows(owner: nn.Module, attr: str, parts: list, hidden_size: int) -> list[int]:
    """Output rows each checkpoint part fills in a (fused) projection."""
    if attr in ("o_proj", "down_proj"):
        return [hidden_size]
    if all(isinstance(p, TensorSlice) and p.dim == 0 for p in parts):
        return [p.stop - p.start for p in parts]
    if attr == "qkv_proj":
        sizes = [owner.q_size, owner.kv_size, owner.kv_size]
    else:  # gate and up
        sizes = [owner.intermediate_size] * 2
    return sizes if len(parts) == len(sizes) else [sum(sizes)]  # one fused checkpoint tensor


# --- the engine's bookkeeping ------------------------------------------------------------

class LoRAManager:
    """Which adapters exist, which are parsed in host memory, which sit in which slot of the
    executor's model, and how many running requests read each slot. Registration is
    thread-safe (an HTTP handler may load while the engine thread schedules); slots belong
    to the engine thread."""

    def __init__(self, max_loras: int, max_cpu_loras: int, max_rank: int, executor) -> None:
        self.max_loras, self.max_cpu_loras, self.max_rank = max_loras, max_cpu_loras, max_rank
        self.executor = executor
        self._lock = threading.Lock()
        self._paths: dict[str, str] = {}
        self._uids: dict[str, int] = {}  # the registered version of each name
        self._cpu: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self._slot_adapters: list[LoRAAdapter | None] = [None] * max_loras
        self._slot_users = [0] * max_loras
        self._slot_used = [0] * max_loras
        self._clock = itertools.count(1)
        self.num_loads = 0  # adapters put into a slot
        self.num_disk_loads = 0  # adapters read from their folder

    # registry (any thread)

    def register(self, name: str, path: str, adapter: LoRAAdapter | None = None) -> LoRAAdapter:
        """Add an adapter under `name` (parsed now, so a bad folder is refused at once)."""
        adapter = adapter or load_adapter(name, path, self.max_rank)
        with self._lock:
            if name in self._paths:
                raise LoRAError(f"a LoRA adapter named {name!r} is already loaded")
            self._paths[name] = str(path)
            self._uids[name] = adapter.uid
            self._keep(name, adapter)
        return adapter

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._paths.pop(name, None) is None:
                raise LoRAError(f"no LoRA adapter named {name!r} is loaded")
            self._uids.pop(name)
            self._cpu.pop(name, None)
        for slot, adapter in enumerate(self._slot_adapters):
            if adapter is not None and adapter.name == name and self._slot_users[slot] == 0:
                self._clear(slot)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    def handle(self, name: str) -> LoRAHandle:
        """What a request keeps of the adapter it names: the version registered now (it is
        served that version even if the name is unloaded or replaced before it runs)."""
        with self._lock:
            if name not in self._paths:
                raise LoRAError(f"no LoRA adapter named {name!r} is loaded")
            return LoRAHandle(name, self._paths[name], self._uids[name])

    def _adapter(self, handle: LoRAHandle) -> LoRAAdapter:
        """The parsed adapter (from host memory, else read again from its folder)."""
        with self._lock:
            adapter = self._cpu.get(handle.name)
            if adapter is not None and adapter.uid == handle.uid:
                self._cpu.move_to_end(handle.name)
                return adapter
        adapter = load_adapter(handle.name, handle.path, self.max_rank)
        adapter.uid = handle.uid
        self.num_disk_loads += 1
        with self._lock:
            if self._uids.get(handle.name) == handle.uid:
                self._keep(handle.name, adapter)
        return adapter

    def _keep(self, name: str, adapter: LoRAAdapter) -> None:
        self._cpu[name] = adapter
        self._cpu.move_to_end(name)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)

    # slots (engine thread)

    def acquire(self, handle: LoRAHandle) -> int | None:
        """A slot holding the adapter for one more running request, loading it into the least
        recently used idle slot if needed; None when every slot is read by running requests."""
        held = [s for s, a in enumerate(self._slot_adapters) if a is not None and a.uid == handle.uid]
        if held:
            slot = held[0]
        else:
            idle = [s for s in range(self.max_loras) if self._slot_users[s] == 0]
            if not idle:
                return None
            slot = min(idle, key=lambda s: self._slot_used[s])
            adapter = self._adapter(handle)
            self.executor.set_lora(slot, adapter)
            self._slot_adapters[slot] = adapter
            self.num_loads += 1
        self._slot_users[slot] += 1
        self._slot_used[slot] = next(self._clock)
        return slot

    def release(self, slot: int) -> None:
        self._slot_users[slot] -= 1
        adapter = self._slot_adapters[slot]
        if self._slot_users[slot] == 0 and self._uids.get(adapter.name) != adapter.uid:
            self._clear(slot)  # unloaded (or replaced) while requests read it

    def _clear(self, slot: int) -> None:
        self._slot_adapters[slot] = None
        self.executor.set_lora(slot, None)

    @property
    def resident(self) -> list[str]:
        return [a.name for a in self._slot_adapters if a is not None]
