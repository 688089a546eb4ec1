"""Speculative decoding: propose k tokens cheaply, verify them in one forward of the model.

A decoding request normally computes one token per step. With speculation it
feeds its last token plus k proposed tokens; the model scores all k+1 positions
at once (the chunked-prefill attention path), and the proposals are accepted up
to the first one the model disagrees with, plus one token the model picks
itself. The KV written for rejected positions is simply overwritten later: the
request's computed-token count only covers accepted tokens.

Proposer here: **prompt lookup** (n-gram): find the most recent earlier
occurrence of the last n tokens (n from `prompt_lookup_max` down to
`prompt_lookup_min`) in the prompt and output so far, and propose the tokens
that followed it. It costs no model and wins when the output repeats the input
(summaries, edits, code, extraction).

Acceptance keeps the output distribution unchanged:
- greedy: accept while the proposal equals the model's argmax; the first
  mismatch is replaced by the argmax (output identical to no speculation);
- sampling: the rejection-sampling rule of Leviathan et al. / Chen et al. with a
  deterministic proposer (q is one-hot on the proposed token): accept token d
  with probability p(d); on rejection sample from p with d removed
  (= normalize(max(p - q, 0))); if all k are accepted, sample one more from p.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from engine.kernels import argmax


def propose_prompt_lookup(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the last n tokens."""
    if k <= 0 or len(tokens) < n_min + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        key = arr[-n:]
        # Windows over all but the last token: the suffix cannot match itself.
        windows = sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == key).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + k].tolist()
    return []


def accept_greedy(logits: torch.Tensor, draft: list[int]) -> list[int]:
    """logits [k+1, V]: the model's argmax up to and including its first disagreement."""
    best = argmax(logits).tolist()
    out = []
    for j, token in enumerate(draft):
        out.append(best[j])
        if best[j] != token:
            return out
    out.append(best[len(draft)])
    return out


def accept_sampled(probs: torch.Tensor, draft: list[int], generator: torch.Generator | None) -> list[int]:
    """probs [k+1, V]: the target distribution at each position (after temperature, top-k/p;
    normalized here)."""
    probs = probs / probs.sum(dim=-1, keepdim=True)
    out = []
    for j, token in enumerate(draft):
        p = probs[j]
        u = torch.rand((), generator=generator, device=p.device)
        if float(u) < float(p[token]):
            out.append(token)
            continue
        residual = p.clone()
        residual[token] = 0.0
        total = float(residual.sum())
        if total <= 0.0:  # p was all on the draft token: it is accepted with probability 1
            out.append(token)
            continue
        out.append(int(torch.multinomial(residual / total, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[len(draft)], 1, generator=generator)))
    return out


def propose(running: list, config, max_model_len: int, drafting: bool) -> None:
    """Proposals for every running request that decodes next (request.spec_token_ids).
    drafting: a draft model proposes; here only placeholders of the right length are set,
    the scheduler sizes the verification chunk (budget, blocks), then the draft runs on the
    chunks it kept (LLMEngine._launch)."""
    for request in running:
        if request.in_flight:  # its proposals are being verified
            continue
        request.spec_token_ids = []
        params = request.sampling_params
        if (request.num_tokens - request.num_computed_tokens != 1 or params.needs_penalties
                or params.logprobs is not None or request.grammar is not None
                or params.thinking_budget is not None):
            continue
        # Room left: the step's own token counts too.
        k = min(config.num_speculative_tokens, params.max_tokens - request.num_output_tokens - 1,
                max_model_len - request.num_tokens - 1)
        if k <= 0:
            continue
        if drafting:
            request.spec_token_ids = [0] * k
        else:
            request.spec_token_ids = propose_prompt_lookup(
                request.all_token_ids, k, config.prompt_lookup_max, config.prompt_lookup_min)
