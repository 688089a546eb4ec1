"""Int8 weights (`quantization: int8`): a quarter of the bytes per weight, read once per step.

Decoding is bound by memory bandwidth: every step reads every weight. Weights are
quantized at load time, symmetric, with one scale per output channel (per row of
the [out, in] matrix), and the matrix products run on PyTorch's own int8 kernels:

- weight-only int8 (`torch._weight_int8pack_mm`): activations stay floating point (bf16
  on the CPU, the model's bf16/fp16 on CUDA). On the CPU, batches above ~32 rows
  (prefill chunks) dequantize the weight and use the float32 GEMM instead, which is
  faster there; where the kernel is missing, weights are dequantized per call.
- not fbgemm's dynamic quantization (int8 activations, one scale per tensor): it is
  ~2x faster still on this CPU, but SmolLM2's activation outliers take its perplexity
  on tests/data/public_domain.txt from 17.0 to 76.

The token embedding is stored as int8 rows with per-row scales too (a row is
dequantized when looked up). Norms, rotary tables and the KV cache stay in the
model's dtype.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.models.layers import MoE

logger = logging.getLogger(__name__)

# Weights per int4 group (one scale and one offset each): GGUF's Q4_0/Q4_1 block size.
INT4_GROUP_SIZE = 32


def _cpu_kernel():
    """semline's CPU extension, if it builds here, with its W4A8/W8A8 kernels."""
    from engine.kernels import load_paged_attention

    kernel = load_paged_attention()
    return kernel if kernel is not None and hasattr(kernel, "q8_linear") else None


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 [N, K], float32 scales [N]) with weight ≈ q * scale."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.to(weight.device), scales.to(weight.device)


class Int8Embedding(nn.Module):
    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.dtype = dtype
        self.packed: torch.Tensor | None = None  # rows read from a tied head's packed int8

    def share_packed(self, head: "CpuW8A8Linear") -> None:
        """Read rows from the tied output head's packed int8 matrix (the same rows and
        scales) and drop this module's own copy."""
        self.packed = head.q8_packed
        self.qweight = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return (self.qweight[ids].float() * self.scales[ids, None]).to(self.dtype)
        # q8_pack's layout [N/16, K/32, 8 steps, 16 rows, 4]: a row is its (group, step, 4) bytes.
        blocks, groups = self.packed.shape[:2]
        rows = self.packed.view(blocks, groups, 8, 16, 4)[ids // 16, :, :, ids % 16, :].reshape(ids.numel(), -1)
        return (rows.float() * self.scales[ids, None]).to(self.dtype)


def tie_int8_embedding(embedding: nn.Module, head: nn.Module) -> None:
    """An int8 embedding and its tied int8 head hold one matrix: the head's packed one."""
    if isinstance(embedding, Int8Embedding) and isinstance(head, CpuW8A8Linear):
        embedding.share_packed(head)


class CpuInt8Linear(nn.Module):
    """CPU, float32 model: int8 weights; small batches (decode) run PyTorch's weight-only int8
    kernel on bf16 activations, large ones (prefill chunks) dequantize the weight and use the
    float32 GEMM, which is faster there."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        # Dequantizing an output head (vocab x hidden) per call costs more than the packed
        # kernel at any decode batch; for the layers' matrices it wins above ~32 rows.
        self.max_packed_rows = 32 if q.numel() < 8 * 2**20 else 1 << 30

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] <= self.max_packed_rows:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight, self.scales_bf16).float()
        else:
            y = x2 @ (self.qweight.float() * self.scales[:, None]).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


class WeightOnlyInt8Linear(nn.Module):
    """Int8 weights, activations in the model's dtype (`torch._weight_int8pack_mm`)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.packed = _int8pack_works(self.qweight.device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.packed:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales)
        else:
            y = x2 @ (self.qweight.to(x.dtype) * self.scales[:, None]).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


_PACK_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


def _int8pack_works(device: torch.device, dtype: torch.dtype) -> bool:
    key = (str(device), dtype)
    if key not in _PACK_SUPPORT:
        try:
            x = torch.ones(2, 64, device=device, dtype=dtype)
            w = torch.ones(64, 64, device=device, dtype=torch.int8)
            y = torch._weight_int8pack_mm(x, w, torch.ones(64, device=device, dtype=dtype))
            _PACK_SUPPORT[key] = bool(torch.allclose(y.float(), torch.full_like(y.float(), 64.0)))
        except (RuntimeError, AttributeError, NotImplementedError):
            _PACK_SUPPORT[key] = False
        if not _PACK_SUPPORT[key]:
            logger.warning("no int8 weight kernel for %s on %s: int8 weights are dequantized per call", dtype, device)
    return _PACK_SUPPORT[key]


class CpuW8A8Linear(nn.Module):
    """Int8 weights on the CPU through semline's kernel (engine/kernels/int4_gemm.cpp): the
    activations quantized to int8 per group of 32 as for 4-bit weights, integer dot products
    (AVX512-VNNI, AVX2): 1.6x PyTorch's weight-only int8 kernel at one decode row, 2x at 8-32.
    The weights are held packed only; an embedding tied to this head reads its rows from
    them (tie_int8_embedding).

    Scales per output row (`scales`, int8 quantized at load), or per group of 32 or 16 inputs
    with optional minimums per group of 32 (`group_scales` [N, K/32 or K/16], `mins` [N, K/32]:
    GGUF's Q8_0, Q5_0/Q5_1/Q5_K and Q6_K blocks, w = q * scale + min), held in the pack;
    `bits` 6: q in -32..31 with scales per 16 (Q6_K; centred Q5_1, Q5_K with their minimums),
    held in 6 bits (+1 of scales, +0.5 of minimums); 5: q in -16..15 with scales per 32 (Q5_0;
    centred Q4 and Q5 types with their minimums), held in 5 bits (+0.5 of scales, +0.5 of
    minimums): the file's own size for Q5_0."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype,
                 group_scales: torch.Tensor | None = None, mins: torch.Tensor | None = None,
                 bits: int = 8) -> None:
        super().__init__()
        self.kernel = _cpu_kernel()
        self.out_features, self.in_features = q.shape
        if bits == 6:  # q in -32..31 with half-group scales (and minimums): the 6-bit record
            packed = six_bit_record(self.kernel.q8_pack((q + 32).contiguous(), group_scales, mins))
        elif bits == 5:  # q in -16..15 with group scales (and minimums): the 5-bit record
            packed = five_bit_record(self.kernel.q8_pack((q + 16).contiguous(), group_scales, mins))
        else:
            packed = self.kernel.q8_pack(q.contiguous(), group_scales, mins)
        self.register_buffer("q8_packed", packed)
        if group_scales is not None:
            scales = torch.ones(self.out_features)
        self.register_buffer("scales", scales.float().contiguous())
        self.bias = None if bias is None else bias.detach().to(dtype).clone()
        self.num_parameters = q.numel() + (0 if bias is None else bias.numel())

    @classmethod
    def from_record(cls, packed: torch.Tensor, out_features: int, in_features: int, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> "CpuW8A8Linear":
        """The layer over records packed already (the extension's gguf_pack: scales in the pack)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.kernel = _cpu_kernel()
        layer.out_features, layer.in_features = out_features, in_features
        layer.register_buffer("q8_packed", packed)
        layer.register_buffer("scales", torch.ones(out_features))
        layer.bias = None if bias is None else bias.detach().to(dtype).clone()
        layer.num_parameters = out_features * in_features + (0 if bias is None else bias.numel())
        return layer

    @property
    def weight_buffers(self) -> list[torch.Tensor]:
        return [self.q8_packed, self.scales]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        y = self.kernel.q8_linear(x2, self.q8_packed, self.scales, bias)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


def six_bit_record(packed: torch.Tensor) -> torch.Tensor:
    """The int8 kernel's half-scales record (576 bytes: 512 weights u = q + 32 in 0..63, 64
    bytes of scales; 608 with 32 of minimums) as its 6-bit record (448, or 480 with the
    minimums: engine/kernels/int4_gemm.cpp, kSix, kSixMin)."""
    u = packed[..., :512].view(torch.uint8)
    low = (u[..., :256] & 0x0F) | ((u[..., 256:] & 0x0F) << 4)
    high = ((u[..., 0:128] >> 4) & 3) | (((u[..., 128:256] >> 4) & 3) << 2) \
        | (((u[..., 256:384] >> 4) & 3) << 4) | (((u[..., 384:512] >> 4) & 3) << 6)
    return torch.cat([low, high, packed[..., 512:].view(torch.uint8)], dim=-1).view(torch.int8).contiguous()


def six_k_record(q: torch.Tensor, super_scales: torch.Tensor, sub_scales: torch.Tensor) -> torch.Tensor:
    """Weights q in -32..31 [N, K] with a Q6_K file's own scales (float16 d per 256 weights,
    float32 [N, K / 256]; int8 sub-scales per 16, [N, K / 16]) as the int8 kernel's super-block
    record (engine/kernels/int4_gemm.cpp, kSixK: [N / 16, K / 32, 420] int8): per 16 rows and
    256 inputs the rows' d, then per group its 6-bit weights and their sub-scales."""
    n, k = q.shape
    blocks, groups, pad = -(-n // 16), k // 32, -n % 16
    weights = six_bit_record(_cpu_kernel().q8_pack((q + 32).contiguous(), torch.ones(n, 2 * groups), None))
    sub = torch.nn.functional.pad(sub_scales, (0, 0, 0, pad)).view(blocks, 16, groups, 2)
    records = torch.cat([weights[..., :384], sub.permute(0, 2, 3, 1).reshape(blocks, groups, 32)], dim=-1)
    d = torch.nn.functional.pad(super_scales.half(), (0, 0, 0, pad)).view(blocks, 16, groups // 8)
    d = d.permute(0, 2, 1).contiguous().view(torch.int8)  # [blocks, K / 256, 32 bytes]
    return torch.cat([d, records.view(blocks, groups // 8, 8 * 416)], dim=-1).reshape(blocks, groups, 420)


def five_bit_record(packed: torch.Tensor) -> torch.Tensor:
    """The int8 kernel's group-scale record (544 bytes: 512 weights u = q + 16 in 0..31, 32
    bytes of scales; 608 with the scales twice and 32 of minimums) as its 5-bit record (352,
    or 384 with the minimums: engine/kernels/int4_gemm.cpp, kFive, kFiveMin)."""
    u = packed[..., :512].view(torch.uint8)
    low = (u[..., :256] & 0x0F) | ((u[..., 256:] & 0x0F) << 4)
    high = sum(((u[..., 64 * t:64 * (t + 1)] >> 4) & 1) << t for t in range(8)).to(torch.uint8)
    fields = packed[..., 512:544] if packed.shape[-1] == 544 else torch.cat([packed[..., 512:544], packed[..., 576:]], -1)
    return torch.cat([low, high, fields.view(torch.uint8)], dim=-1).view(torch.int8).contiguous()


def packed_rows(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a packed layer's weight matrix ([len(ids), K] float32, as its kernel
    reads them): a CpuW8A8Linear of any record format or a CpuInt4Linear on semline's kernel
    (the extension's packed_rows: a prefill's 512 lookups ~1 ms where indexing the records
    in PyTorch took ~60)."""
    if isinstance(module, CpuInt4Linear):
        return module.kernel.packed_rows(module.q4_packed, ids, module.out_features)
    return module.kernel.packed_rows(module.q8_packed, ids, module.out_features, module.scales)


class PackedEmbedding(nn.Module):
    """A token embedding that reads its rows from a packed layer of semline's kernels (the
    output head tied to it, or, with `owner`, its own table), so the matrix is held once, at
    the file's precision."""

    def __init__(self, table: nn.Module, dtype: torch.dtype, owner: bool = False) -> None:
        super().__init__()
        self.rows_of = [table]  # in a list: a head shared with the model is not a submodule here
        if owner:
            self.table = table
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return packed_rows(self.rows_of[0], ids.reshape(-1)).to(self.dtype).view(*ids.shape, -1)


def int8_linear(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
                dtype: torch.dtype, int8_activations: bool = False) -> nn.Module:
    """The int8 layer for a model of `dtype` on `device`. With `int8_activations`, on the CPU,
    semline's W8A8 kernel where the extension builds and the input splits into groups of 32
    (2.3x the single-stream rate of weight-only int8 here, perplexity +3.0 % instead of +1.2 %
    for SmolLM2, whose activations have outliers). Else weight-only: CpuInt8Linear for a CPU
    float32 model, WeightOnlyInt8Linear otherwise."""
    if int8_activations and device.type == "cpu" and q.shape[1] % INT4_GROUP_SIZE == 0 \
            and _cpu_kernel() is not None:
        return CpuW8A8Linear(q, scales, bias, dtype)
    if device.type == "cpu" and dtype == torch.float32:
        return CpuInt8Linear(q, scales, bias)
    return WeightOnlyInt8Linear(q, scales, bias, dtype)


def quantize_model(model: nn.Module, device: torch.device, dtype: torch.dtype, method: str = "int8") -> int:
    """Swap every linear layer (and the token embedding) of `model` for its int8 form (method
    "int8": weight-only; "w8a8": int8 activations too, CPU), or with
    `method` "int4" every linear layer for its 4-bit form (CPU; the embedding stays int8, and
    a linear layer whose input does not split into 4-bit groups stays int8); returns how many
    modules were swapped. In int8, a tied output head and embedding share one int8 matrix
    (per-row scales serve both: rows are the head's output channels and the embedding's tokens)."""
    quantized: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    embed, head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
    tied = embed is not None and head is not None and getattr(head, "weight", None) is embed.weight

    def rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = weight.data_ptr()
        if key not in quantized:
            quantized[key] = quantize_rows(weight)
        return quantized[key]

    swapped = 0
    for parent in list(model.modules()):
        if isinstance(parent, MoE):  # the router stays in float: int8 scores would flip routing
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and method == "int4" and int4_supported(child):
                setattr(parent, name, CpuInt4Linear(*quantize_groups_4bit(child.weight), child.bias))
                swapped += 1
            elif isinstance(child, nn.Linear):
                setattr(parent, name, int8_linear(*rows(child.weight), child.bias, device, dtype,
                                                  int8_activations=method == "w8a8"))
                swapped += 1
            elif isinstance(child, nn.Embedding):
                setattr(parent, name, Int8Embedding(*rows(child.weight), dtype))
                swapped += 1
    if tied:  # the swapped modules
        tie_int8_embedding(model.embed_tokens, model.lm_head)
    return swapped


def quantize_groups_4bit(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE):
    """Asymmetric 4-bit groups of `group_size` weights along each row: (q in 0..15 as int32
    [N, K], scales [N, K/g], offsets [N, K/g]) with weight ≈ q * scale + offset (GGUF Q4_1's
    form: a block's scale d and minimum m)."""
    rows, cols = weight.shape
    w = weight.detach().float().view(rows, cols // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((w - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(rows, cols), scales, low


class CpuInt4Linear(nn.Module):
    """4-bit weights in groups of 32 along the input (GGUF Q4_1's form: w = q * scale + min;
    8x fewer weight bytes than bf16 read per step), multiplied by:

    - semline's W4A8 kernel (engine/kernels/int4_gemm.cpp) where the CPU extension builds:
      activations quantized to int8 per group, integer dot products (AVX512-VNNI, AVX2),
      ~1.4x PyTorch's kernel at one decode row and ~2x at 8-32;
    - else PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) on bf16 activations,
      which computes (q - 8) * scale + zero, so a group's minimum m is stored as
      zero = m + 8 * scale.

    Any dtype in, the same dtype out. `use_kernel` False forces PyTorch's kernel."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int = INT4_GROUP_SIZE, use_kernel: bool = True) -> None:
        super().__init__()
        self.group_size = group_size
        self.out_features, self.in_features = q.shape
        self.bias = None if bias is None else bias.detach().clone()
        # What runners report as this layer's parameters (the packed buffers hold two per byte).
        self.num_parameters = q.numel() + (0 if bias is None else bias.numel())
        self.kernel = _cpu_kernel() if use_kernel and group_size == 32 else None
        if self.kernel is not None:
            self.register_buffer("q4_packed", self.kernel.q4_pack(q, scales, offsets))
            return
        self.register_buffer("packed_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
        zeros = offsets + 8 * scales
        # [K/g, N, 2]: per group of the input, per output channel, (scale, zero).
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1)
                             .contiguous().to(torch.bfloat16))

    @classmethod
    def from_record(cls, packed: torch.Tensor, out_features: int, in_features: int,
                    bias: torch.Tensor | None) -> "CpuInt4Linear":
        """The layer over q4_pack's records packed already (the extension's gguf_pack)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.group_size = INT4_GROUP_SIZE
        layer.out_features, layer.in_features = out_features, in_features
        layer.bias = None if bias is None else bias.detach().clone()
        layer.num_parameters = out_features * in_features + (0 if bias is None else bias.numel())
        layer.kernel = _cpu_kernel()
        layer.register_buffer("q4_packed", packed)
        return layer

    @property
    def weight_buffers(self) -> list[torch.Tensor]:
        """The tensors a product reads (for byte counts)."""
        return [self.q4_packed] if self.kernel is not None else [self.packed_int4, self.scales_and_zeros]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if self.kernel is not None:
            bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
            y = self.kernel.q4_linear(x2, self.q4_packed, self.out_features, bias)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed_int4, self.group_size,
                                                      self.scales_and_zeros)
        if x.dtype != torch.bfloat16:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)




def int4_supported(linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> bool:
    return linear.in_features % group_size == 0


def layer_kinds(model: nn.Module) -> dict[str, int]:
    """How many linear layers and embeddings of each kind a model runs: float (Linear,
    OneDNNLinear, Embedding), 4-bit (CpuInt4Linear), the int8 kernel's by record size
    ("CpuW8A8Linear/448B"), an embedding read from packed rows (PackedEmbedding)..."""
    kinds: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if name in ("CpuInt4Linear", "CpuW8A8Linear", "Linear", "OneDNNLinear", "Embedding", "PackedEmbedding",
                    "Int8Embedding"):
            key = name if name != "CpuW8A8Linear" else f"{name}/{module.q8_packed.shape[2]}B"
            kinds[key] = kinds.get(key, 0) + 1
    return kinds


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy (shared tensors once, prepacked int8 weights included)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen or tensor.device.type == "meta":
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    for module in model.modules():
        if hasattr(module, "packed_weight"):  # a oneDNN-prepacked float linear
            total += module.packed_weight.numel() * module.packed_weight.element_size()
    return total
