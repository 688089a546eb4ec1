"""Llama 1/2/3.x (and SmolLM, which is a Llama) and Mistral.

Llama: pre-norm decoder, grouped-query attention, SwiGLU MLP; every rope scaling
transformers defines (default, linear, dynamic, llama3, yarn) comes from the config.
Mistral: the same with sliding-window attention on every layer when the config sets
`sliding_window`.
"""

from __future__ import annotations

from engine.models.base import ModelArgs, ModelFamily, common_args, register_family, window_layers


def llama_args(config) -> ModelArgs:
    bias = bool(getattr(config, "attention_bias", False))
    return ModelArgs(**common_args(config, qkv_bias=bias, o_bias=bias))


def mistral_args(config) -> ModelArgs:
    window = getattr(config, "sliding_window", None)
    return ModelArgs(**common_args(config), **window_layers(config, window, lambda i: True))


LLAMA = register_family(("llama",), ModelFamily("llama", llama_args))
MISTRAL = register_family(("mistral",), ModelFamily("mistral", mistral_args))
