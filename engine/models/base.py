"""The decoder-only transformer every supported family is an instance of, and the
registry that maps a Hugging Face config to its family.

Takes a flat batch of T tokens from many sequences, each with its own position,
so prefill chunks and decode tokens of different requests run in one forward.
What differs between families (norm variants, q/k norms, sliding windows, soft-capping,
experts, checkpoint names) is data in `ModelArgs` and the family's `weight_map`;
a family file (llama.py, gemma2.py, ...) fills both and registers itself.
Shapes in comments: T tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.models.layers import Attention, GatedMLP, MoE, RMSNorm, RotaryEmbedding, build_rotary
from engine.parallel import TensorParallel

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class ModelArgs:
    """The architecture numbers and switches the forward pass needs, read from a HF config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # q and k normalised per head before the rotation (Qwen3, Gemma 3).
    qk_norm: bool = False
    # Gemma's RMS norm multiplies by (1 + weight).
    norm_offset: float = 0.0
    # Gemma 2/3: norms after attention and around the MLP ("sandwich"), not only before.
    sandwich_norms: bool = False
    # Gemma: the embedding is multiplied by sqrt(hidden_size) (in the model's dtype).
    embed_scale: float | None = None
    # Attention score scale; None = head_dim ** -0.5.
    attn_scale: float | None = None
    # Soft-capping of attention scores and of the final logits (Gemma 2): cap * tanh(x / cap).
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Per layer: "full_attention" or "sliding_attention" (also picks the rope tables), and
    # the window of keys each query sees (None = the whole context).
    layer_types: list[str] = field(default_factory=list)
    layer_windows: list[int | None] = field(default_factory=list)
    # Routed experts (0 = a dense model); moe_layers[i]: layer i has experts, else a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layer_types = self.layer_types or [FULL] * self.num_layers
        self.layer_windows = self.layer_windows or [None] * self.num_layers
        self.moe_layers = self.moe_layers or [self.num_experts > 0] * self.num_layers
        if not len(self.layer_types) == len(self.layer_windows) == len(self.moe_layers) == self.num_layers:
            raise ValueError("layer_types, layer_windows and moe_layers need one entry per layer")
        if self.hidden_act not in ("silu", "gelu_pytorch_tanh", "gelu_tanh", "gelu"):
            raise ValueError(f"unsupported activation {self.hidden_act!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads cannot share {self.num_kv_heads} KV heads evenly")

    @functools.cached_property
    def num_parameters(self) -> int:
        """Parameters touched per token by the matmuls (embedding lookup excluded, head
        included); an MoE layer counts its router and the experts a token is routed to.
        Computed once (every step's FLOPs accounting asks, per chunk)."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        dense = 3 * self.hidden_size * self.intermediate_size
        routed = self.num_experts_per_tok * 3 * self.hidden_size * self.moe_intermediate_size \
            + self.num_experts * self.hidden_size
        mlp = sum(routed if moe else dense for moe in self.moe_layers)
        return self.num_layers * attn + mlp + self.vocab_size * self.hidden_size

    def first_layers(self, num_layers: int) -> "ModelArgs":
        """The same model cut after its first `num_layers` layers (a self-speculative draft)."""
        return dataclasses.replace(self, num_layers=num_layers, layer_types=self.layer_types[:num_layers],
                                   layer_windows=self.layer_windows[:num_layers],
                                   moe_layers=self.moe_layers[:num_layers])


# --- checkpoint names -----------------------------------------------------------

class TensorSlice(NamedTuple):
    """Rows (dim 0) or columns (dim 1) [start, stop) of a checkpoint tensor: what a
    tensor-parallel rank reads of it (engine/loader.py reads only the slice)."""

    name: str
    dim: int
    start: int
    stop: int


# A checkpoint tensor, whole (its name) or a slice of it.
Part = "str | TensorSlice"
# Our parameter name -> the checkpoint parts concatenated along dim 0 to make it (q, k, v
# into qkv_proj; gate, up into gate_up_proj); for the experts' [E, ...] tensors, one such
# list per expert (stacked).
WeightMap = dict[str, "list[Part] | list[list[Part]]"]


def standard_layer_map(args: ModelArgs, i: int) -> WeightMap:
    """Our layer i's parameters from checkpoint names as Llama, Mistral, Qwen and Gemma save them."""
    ours, theirs = f"layers.{i}.", f"model.layers.{i}."
    attn = theirs + "self_attn."
    names: WeightMap = {
        ours + "self_attn.qkv_proj.weight": [attn + f"{p}_proj.weight" for p in "qkv"],
        ours + "self_attn.o_proj.weight": [attn + "o_proj.weight"],
        ours + "input_layernorm.weight": [theirs + "input_layernorm.weight"],
        ours + "post_attention_layernorm.weight": [theirs + "post_attention_layernorm.weight"],
    }
    if args.qkv_bias:
        names[ours + "self_attn.qkv_proj.bias"] = [attn + f"{p}_proj.bias" for p in "qkv"]
    if args.o_bias:
        names[ours + "self_attn.o_proj.bias"] = [attn + "o_proj.bias"]
    if args.qk_norm:
        names[ours + "self_attn.q_norm.weight"] = [attn + "q_norm.weight"]
        names[ours + "self_attn.k_norm.weight"] = [attn + "k_norm.weight"]
    if args.sandwich_norms:
        for norm in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
            names[ours + norm + ".weight"] = [theirs + norm + ".weight"]
    if not args.moe_layers[i]:
        mlp = theirs + "mlp."
        names[ours + "mlp.gate_up_proj.weight"] = [mlp + "gate_proj.weight", mlp + "up_proj.weight"]
        names[ours + "mlp.down_proj.weight"] = [mlp + "down_proj.weight"]
        if args.mlp_bias:
            names[ours + "mlp.gate_up_proj.bias"] = [mlp + "gate_proj.bias", mlp + "up_proj.bias"]
            names[ours + "mlp.down_proj.bias"] = [mlp + "down_proj.bias"]
    return names


def expert_map(args: ModelArgs, i: int, prefix: str, gate: str, up: str, down: str) -> WeightMap:
    """Layer i's router and experts from per-expert checkpoint tensors
    (`{prefix}.experts.{e}.{gate|up|down}.weight` and `{prefix}.gate.weight`)."""
    experts = range(args.num_experts)
    return {
        f"layers.{i}.mlp.gate.weight": [f"{prefix}.gate.weight"],
        f"layers.{i}.mlp.gate_up": [[f"{prefix}.experts.{e}.{gate}.weight",
                                     f"{prefix}.experts.{e}.{up}.weight"] for e in experts],
        f"layers.{i}.mlp.down": [[f"{prefix}.experts.{e}.{down}.weight"] for e in experts],
    }


def shard_weight_map(names: WeightMap, args: ModelArgs, tp: TensorParallel) -> WeightMap:
    """The parts of each parameter that tensor-parallel rank `tp.rank` holds (engine/parallel.py):
    its heads' rows of q/k/v and columns of o, its intermediate rows of gate/up and columns of
    down (every expert's), its vocabulary rows of the embedding and head; row-parallel biases
    on rank 0 only; everything else whole. Fused checkpoint tensors (Phi-3's qkv_proj and
    gate_up_proj) are sliced at their parts' boundaries."""
    if not tp.enabled:
        return names
    dh = args.head_dim
    (qa, qb), (ka, kb) = ((a * dh, b * dh) for a, b in tp.heads(args.num_heads, args.num_kv_heads))
    q_size, kv_size = args.num_heads * dh, args.num_kv_heads * dh
    va, vb = tp.vocab(args.vocab_size)

    def rows(parts: list[str], ranges: list[tuple[int, int]], fused_sizes: list[int]) -> list[TensorSlice]:
        if len(parts) == len(ranges):  # one checkpoint tensor per part
            return [TensorSlice(name, 0, a, b) for name, (a, b) in zip(parts, ranges)]
        (name,), offsets = parts, [sum(fused_sizes[:i]) for i in range(len(fused_sizes))]
        return [TensorSlice(name, 0, off + a, off + b) for off, (a, b) in zip(offsets, ranges)]

    def gate_up(parts: list[str], intermediate: int) -> list[TensorSlice]:
        ia, ib = tp.split(intermediate, "MLP columns")
        return rows(parts, [(ia, ib)] * 2, [intermediate] * 2)

    def down(parts: list[str], intermediate: int) -> list[TensorSlice]:
        return [TensorSlice(parts[0], 1, *tp.split(intermediate, "MLP columns"))]

    sharded: WeightMap = {}
    for ours, parts in names.items():
        if ours.endswith(("o_proj.bias", "down_proj.bias")):
            if tp.rank == 0:  # added once, before the all-reduce
                sharded[ours] = parts
        elif ours.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            sharded[ours] = rows(parts, [(qa, qb), (ka, kb), (ka, kb)], [q_size, kv_size, kv_size])
        elif ours.endswith("o_proj.weight"):
            sharded[ours] = [TensorSlice(parts[0], 1, qa, qb)]
        elif ours.endswith(("gate_up_proj.weight", "gate_up_proj.bias")):
            sharded[ours] = gate_up(parts, args.intermediate_size)
        elif ours.endswith("down_proj.weight"):
            sharded[ours] = down(parts, args.intermediate_size)
        elif ours.endswith("mlp.gate_up"):
            sharded[ours] = [gate_up(expert, args.moe_intermediate_size) for expert in parts]
        elif ours.endswith("mlp.down"):
            sharded[ours] = [down(expert, args.moe_intermediate_size) for expert in parts]
        elif ours in ("embed_tokens.weight", "lm_head.weight"):
            sharded[ours] = [TensorSlice(parts[0], 0, va, vb)]
        else:
            sharded[ours] = parts
    return sharded


# --- the model -------------------------------------------------------------------

class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int, tp: TensorParallel) -> None:
        super().__init__()
        eps, offset = args.rms_norm_eps, args.norm_offset
        self.input_layernorm = RMSNorm(args.hidden_size, eps, offset)
        self.self_attn = Attention(args, index, tp)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps, offset)
        self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        if args.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps, offset)
        self.mlp = MoE(args, tp) if args.moe_layers[index] else \
            GatedMLP(args.hidden_size, args.intermediate_size, args.mlp_bias, args.hidden_act, tp)

    def forward(self, x, positions, rotary, kv_cache, metas):
        attn = self.self_attn(self.input_layernorm(x), positions, rotary, kv_cache, metas)
        if self.pre_feedforward_layernorm is None:  # Llama: pre-norms only
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)  # Gemma: normalise each branch's output too
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class CausalLM(nn.Module):
    """The decoder stack for layers [first_layer, last_layer); embedding and head on the ends.
    Families differ only in `args` and `weight_map` (see `register_family`). Under tensor
    parallelism (`tp`), this rank's share of every layer, embedding and head."""

    def __init__(self, args: ModelArgs, layer_map: Callable[[ModelArgs, int], WeightMap],
                 first_layer: int = 0, last_layer: int | None = None, tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.args = args
        self.layer_map = layer_map
        self.tp = tp
        self.first_layer = first_layer
        self.last_layer = args.num_layers if last_layer is None else last_layer
        self.is_first = first_layer == 0
        self.is_last = self.last_layer == args.num_layers
        # Rotary tables per layer type, set by set_rotary() outside any meta-device context.
        self.rotary: dict[str, RotaryEmbedding] = {}
        vocab_start, vocab_stop = tp.vocab(args.vocab_size)  # this rank's rows
        # Its weight given, not initialised: a random init on the meta device imports PyTorch's
        # reference ops (torch._refs: ~0.8 s and ~100 MiB of a process) for nothing.
        self.embed_tokens = nn.Embedding(vocab_stop - vocab_start, args.hidden_size,
                                         _weight=torch.empty(vocab_stop - vocab_start, args.hidden_size)) \
            if self.is_first else None
        self.layers = nn.ModuleList(DecoderLayer(args, i, tp) for i in range(self.first_layer, self.last_layer))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_offset) if self.is_last else None
        self.lm_head = nn.Linear(args.hidden_size, vocab_stop - vocab_start, bias=False) if self.is_last else None

    def set_rotary(self, hf_config, max_positions: int, device: torch.device) -> None:
        types = {layer.self_attn.rope_key for layer in self.layers}
        self.rotary = {t: build_rotary(hf_config, self.args.head_dim, max_positions, t).to(device) for t in types}

    @functools.cached_property
    def windows(self) -> frozenset[int | None]:
        """The layers' attention windows (None: full attention). Fixed at construction and read
        every step to build the attention metadata: computed once (a set over the layers
        through nn.Module's attribute lookup cost ~20 us a step)."""
        return frozenset(layer.self_attn.window for layer in self.layers)

    @property
    def num_kv_heads(self) -> int:
        """KV heads each layer's cache holds here (this rank's, under tensor parallelism)."""
        return self.layers[0].self_attn.num_kv_heads

    def forward(self, input_ids_or_hidden: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                metas: dict[int | None, AttentionMetadata]) -> torch.Tensor:
        """[T] token ids (first stage) or [T, D] hidden states -> [T, D] hidden states.
        metas: the step's attention metadata per window (None: full attention)."""
        x = self.embed(input_ids_or_hidden) if self.is_first else input_ids_or_hidden
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, positions, self.rotary[layer.self_attn.rope_key], kv_cache, metas)
        return x

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, D] embeddings (first stage only)."""
        x = self.tp.embed(self.embed_tokens, input_ids, self.args.vocab_size)
        if self.args.embed_scale is not None:  # in the model's dtype, as HF rounds it
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, D] last-layer hidden states -> [N, V] fp32 logits (this rank's vocabulary
        columns under tensor parallelism: TensorParallel.gather_logits joins them)."""
        logits = self.lm_head(self.norm(hidden)).float()
        if self.args.final_softcap is not None:
            cap = self.args.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    # --- weights ------------------------------------------------------------

    def weight_map(self) -> WeightMap:
        """Each of our parameters -> the checkpoint parts it is made of (this stage's only)."""
        names: WeightMap = {}
        for i in range(self.first_layer, self.last_layer):
            local = self.layer_map(self.args, i)
            names.update({k.replace(f"layers.{i}.", f"layers.{i - self.first_layer}.", 1): v
                          for k, v in local.items()})
        if self.is_first:
            names["embed_tokens.weight"] = ["model.embed_tokens.weight"]
        if self.is_last:
            names["norm.weight"] = ["model.norm.weight"]
            if not self.args.tie_word_embeddings:
                names["lm_head.weight"] = ["lm_head.weight"]
            elif not self.is_first:  # tied, but the embedding lives in another stage
                names["lm_head.weight"] = ["model.embed_tokens.weight"]
        return shard_weight_map(names, self.args, self.tp)

    def weight_parts(self, skip: frozenset[str] = frozenset()) -> list[Part]:
        """The checkpoint tensors (or slices of them) this module needs (for partial loading),
        but for those of our parameters named in `skip`."""
        return sorted({part for name, parts in self.weight_map().items() if name not in skip
                       for part in _flatten(parts)}, key=str)

    @torch.no_grad()
    def load_weights(self, tensors: dict[str, torch.Tensor], skip: frozenset[str] = frozenset()) -> None:
        """Fill every parameter (but those named in `skip`, which their modules get some other
        way) from checkpoint tensors named as in HF checkpoints."""
        params = dict(self.named_parameters())
        for name, parts in self.weight_map().items():
            if name not in skip:
                _copy(params[name], _assemble(tensors, parts), name)
        if self.is_last and self.args.tie_word_embeddings and self.is_first:
            self.lm_head.weight = self.embed_tokens.weight  # share, don't copy


class TruncatedModel(nn.Module):
    """The embedding, the first `num_layers` layers and the output head of a whole model,
    sharing its modules: a draft for self-speculative decoding that needs no second model."""

    def __init__(self, model: CausalLM, num_layers: int) -> None:
        super().__init__()
        if not 1 <= num_layers <= len(model.layers):
            raise ValueError(f"a truncated model keeps 1 to {len(model.layers)} layers, not {num_layers}")
        self.args = model.args.first_layers(num_layers)
        self.is_first = self.is_last = True
        self.tp = model.tp
        self.rotary = model.rotary
        self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleList(list(model.layers)[:num_layers])
        self.norm = model.norm
        self.lm_head = model.lm_head

    forward = CausalLM.forward
    embed = CausalLM.embed
    compute_logits = CausalLM.compute_logits
    windows = CausalLM.windows
    num_kv_heads = CausalLM.num_kv_heads


def _flatten(parts) -> list[Part]:
    return [name for expert in parts for name in expert] if isinstance(parts[0], list) else parts


def _assemble(tensors: dict[str, torch.Tensor], parts) -> torch.Tensor:
    if isinstance(parts[0], list):  # experts: one tensor per expert, stacked
        return torch.stack([_assemble(tensors, expert) for expert in parts])
    return tensors[parts[0]] if len(parts) == 1 else torch.cat([tensors[name] for name in parts])


def _copy(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if param.shape != value.shape:
        raise ValueError(f"weight shape mismatch for {name}: expected {tuple(param.shape)}, "
                         f"got {tuple(value.shape)}")
    param.copy_(value)


# --- the registry ------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFamily:
    """How to read one family's config and checkpoint."""

    name: str
    # HF config -> ModelArgs (raises ValueError for settings semline does not run).
    args_from_config: Callable[[object], ModelArgs]
    # (args, layer index) -> that layer's parameters' checkpoint parts.
    layer_map: Callable[[ModelArgs, int], WeightMap] = standard_layer_map


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(model_types: tuple[str, ...], family: ModelFamily) -> ModelFamily:
    for model_type in model_types:
        _FAMILIES[model_type] = family
    return family


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def resolve_family(hf_config) -> ModelFamily:
    """The family of a HF config (by model_type), or a ValueError naming what is supported."""
    model_type = getattr(hf_config, "model_type", None)
    family = _FAMILIES.get(model_type)
    if family is None:
        architectures = ", ".join(getattr(hf_config, "architectures", None) or []) or "?"
        raise ValueError(f"unsupported architecture {model_type!r} ({architectures}): semline runs "
                         f"{', '.join(supported_model_types())} models")
    return family


def model_args(hf_config) -> ModelArgs:
    return resolve_family(hf_config).args_from_config(hf_config)


def build_model(hf_config, first_layer: int = 0, last_layer: int | None = None,
                tp: TensorParallel = TensorParallel()) -> CausalLM:
    """The module for layers [first_layer, last_layer) of a HF config's model, tensor-parallel
    rank tp.rank's share of it (parameters uninitialised; fill with load_weights, then
    set_rotary)."""
    family = resolve_family(hf_config)
    return CausalLM(family.args_from_config(hf_config), family.layer_map, first_layer, last_layer, tp)


def common_args(config, **overrides) -> dict:
    """The ModelArgs fields every family reads the same way from its HF config."""
    num_heads = config.num_attention_heads
    values = dict(
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        hidden_act=getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", "silu"),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
    )
    values.update(overrides)
    return values


def window_layers(config, window: int | None, sliding: Callable[[int], bool]) -> dict:
    """layer_types / layer_windows for a model whose layer i slides when sliding(i); the
    config's own `layer_types` (transformers 4.53+) wins where present."""
    n = config.num_hidden_layers
    types = list(getattr(config, "layer_types", None) or
                 [SLIDING if window is not None and sliding(i) else FULL for i in range(n)])
    if window is None:
        types = [FULL] * n
    return {"layer_types": types, "layer_windows": [window if t == SLIDING else None for t in types]}
