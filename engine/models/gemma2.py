"""Gemma 2 and Gemma 3 (text): RMS norms that scale by (1 + weight), norms around both
branches of each layer, an embedding scaled by sqrt(hidden_size), GeLU-tanh MLPs, the
attention scale from `query_pre_attn_scalar`, and local (sliding-window) layers
alternating with global ones.

Gemma 2 soft-caps the attention scores and the final logits; Gemma 3 drops the
soft-capping, adds q/k norms and gives its local layers their own rope base
(`rope_parameters["sliding_attention"]`)."""

from __future__ import annotations

from engine.models.base import ModelArgs, ModelFamily, common_args, register_family, window_layers


def gemma_args(config) -> ModelArgs:
    bias = bool(getattr(config, "attention_bias", False))
    window = getattr(config, "sliding_window", None)
    return ModelArgs(
        **common_args(config, qkv_bias=bias, o_bias=bias, qk_norm=config.model_type == "gemma3_text",
                      # Gemma's MLP reads hidden_activation (old configs also carry a hidden_act)
                      hidden_act=getattr(config, "hidden_activation", None) or config.hidden_act),
        norm_offset=1.0,
        sandwich_norms=True,
        embed_scale=config.hidden_size**0.5,
        attn_scale=config.query_pre_attn_scalar**-0.5,
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        final_softcap=getattr(config, "final_logit_softcapping", None),
        **window_layers(config, window, lambda i: i % 2 == 0),
    )


GEMMA = register_family(("gemma2", "gemma3_text"), ModelFamily("gemma", gemma_args))
