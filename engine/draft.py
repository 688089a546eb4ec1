"""Model-based proposers for speculative decoding: a draft model, or the target's own first layers.

The engine's scheduler reserves the verification chunk first (the last token plus
k placeholder proposals, blocks allocated), then the drafter fills the
placeholders: k greedy forwards of the draft, batched over every request that
speculates this step. Its KV cache uses the target's block ids, so the slots the
verification chunk owns are the ones the draft writes.

- `draft_model`: a second (smaller) model that shares the tokenizer, with its own
  KV cache of the same number of blocks. A request's draft KV covers its first
  `draft_num_computed_tokens` positions; each proposal first catches up on what
  it missed (the prompt, the tokens accepted last step), and afterwards keeps
  only the positions the target accepted. Preemption (new block ids) resets it.
- `self_speculative`: the target's first `speculative_draft_layers` layers and
  its output head. It needs no second model and no cache of its own: those
  layers' KV for computed tokens is exactly the target's, so it starts at the
  last token; what it writes for proposed positions the verification overwrites.

Proposals are the draft's argmax; the verification (greedy: argmax match;
sampling: rejection rule with a deterministic proposer) keeps the target's
output unchanged either way (engine/speculative.py).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from engine.config import ConfigError, EngineConfig
from engine.kernels import argmax
from engine.loader import load_hf_config, load_tokenizer, resolve_model_dir
from engine.model_runner import ModelRunner, StepPlan
from engine.scheduler import ScheduledChunk

logger = logging.getLogger(__name__)


class Drafter:
    def __init__(self, config: EngineConfig, target: ModelRunner, tokenizer, max_model_len: int) -> None:
        self.block_size = config.block_size
        if config.speculative_method == "self_speculative":
            if not isinstance(target, ModelRunner):
                raise ConfigError("self_speculative needs the whole model in one process "
                                  "(tensor_parallel_size and pipeline_parallel_size 1); use draft_model or prompt_lookup")
            num_layers = config.speculative_draft_layers or max(1, target.args.num_layers // 4)
            if num_layers >= target.args.num_layers:
                raise ConfigError(f"speculative_draft_layers must be below the model's "
                                  f"{target.args.num_layers} layers, got {num_layers}")
            self.runner = target.first_layers(num_layers)
            self.shares_cache = True
            self.description = f"first {num_layers} of {target.args.num_layers} layers"
        else:
            model_dir = resolve_model_dir(config.speculative_model, config.resolve_cache_dir())
            hf_config = load_hf_config(model_dir)
            _check_same_tokenizer(load_tokenizer(model_dir), tokenizer, model_dir)
            draft_config = dataclasses.replace(
                config, model=config.speculative_model, tensor_parallel_size=1, pipeline_parallel_size=1, pipeline_layers=None,
                num_kv_blocks=target.num_blocks, speculative_method="none")
            max_len = min(max_model_len, hf_config.max_position_embeddings)
            self.runner = ModelRunner(draft_config, hf_config, Path(model_dir), target.device, target.dtype, max_len)
            self.shares_cache = False
            self.description = f"draft model {Path(model_dir).name}"
        # Parameters the draft's matmuls touch per token (for the FLOPs figure).
        self.num_parameters = self.runner.model.args.num_parameters
        logger.info("speculative decoding with %s", self.description)

    def propose(self, chunks: list[ScheduledChunk]) -> int:
        """Fill each chunk's placeholder proposals (request.spec_token_ids[:num_spec_tokens])
        with the draft's greedy tokens. Returns the number of tokens the draft computed."""
        spans = []  # (request, first position to feed, proposals still wanted)
        for chunk in chunks:
            request = chunk.request
            start = request.num_computed_tokens if self.shares_cache else request.draft_num_computed_tokens
            spans.append((request, start, chunk.num_spec_tokens))
        num_computed, j = 0, 0
        while spans:
            plan = StepPlan()
            for request, start, _ in spans:
                # Feed [start, n + j): the tokens it missed, then the proposal before this one.
                plan.add(request, start, request.num_tokens + j, 1, self.block_size)
            logits = self.runner.execute(self.runner.build(plan))
            tokens = argmax(logits).tolist()
            num_computed += len(plan.input_ids)
            next_spans = []
            for (request, _, wanted), token in zip(spans, tokens):
                end = request.num_tokens + j
                request.spec_token_ids[j] = token
                request.draft_num_computed_tokens = end
                if wanted > 1:
                    next_spans.append((request, end, wanted - 1))
            spans, j = next_spans, j + 1
        return num_computed


def _check_same_tokenizer(draft, target, model_dir) -> None:
    if draft.get_vocab() != target.get_vocab():
        raise ConfigError(f"the draft model at {model_dir} does not share the target's tokenizer")
