"""Model families: one file each, registered by the HF config's model_type.

Adding a family is adding a file that fills `ModelArgs` from its config (and names its
checkpoint tensors where they differ from Llama's), then importing it here.
"""

from engine.models import gemma2, llama, mixtral, phi3, qwen2, qwen3, qwen3_moe  # noqa: F401  (registration)
from engine.models.base import (CausalLM, ModelArgs, TruncatedModel, build_model, model_args, resolve_family,
                                supported_model_types)

__all__ = ["CausalLM", "ModelArgs", "TruncatedModel", "build_model", "model_args", "resolve_family",
           "supported_model_types"]
