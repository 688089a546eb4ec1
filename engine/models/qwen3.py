"""Qwen3: a Llama with RMS norms on each head's q and k (before the rotation), no q/k/v
bias by default, Qwen's sliding-window rule."""

from __future__ import annotations

from engine.models.base import ModelArgs, ModelFamily, common_args, register_family
from engine.models.qwen2 import qwen_windows


def qwen3_args(config) -> ModelArgs:
    bias = bool(getattr(config, "attention_bias", False))
    return ModelArgs(**common_args(config, qkv_bias=bias, o_bias=bias, qk_norm=True), **qwen_windows(config))


QWEN3 = register_family(("qwen3",), ModelFamily("qwen3", qwen3_args))
