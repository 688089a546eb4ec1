"""From logits to one token per sequence: penalties, temperature, top-k/p, min-p, seeds, logprobs.

Logprobs are the model's own distribution (log-softmax of the raw logits), as
OpenAI and vLLM report them. A request with a seed samples from its own
generator, so its text does not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import thinking
from engine.kernels import argmax
from engine.request import Request
from engine.speculative import accept_greedy, accept_sampled



@dataclass
class SampledLogprobs:
    """Logprob of the sampled token and the top-n alternatives."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class PositionLogprobs:
    """Prompt logprobs of consecutive positions: each given token's logprob and rank, and the
    top-n alternatives at each position."""

    logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


def position_logprobs(logits: torch.Tensor, targets: list[int], num_top: int) -> PositionLogprobs:
    """logits [N, V]: row i the model's prediction of targets[i] (log-softmax in fp32)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(targets, dtype=torch.long, device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, index)
    ranks = (logprobs > chosen).sum(dim=1) + 1
    top_values, top_ids = [[] for _ in targets], [[] for _ in targets]
    if num_top > 0:
        values, ids = logprobs.topk(num_top, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    return PositionLogprobs(chosen.squeeze(1).tolist(), ranks.tolist(), top_ids, top_values)


@dataclass
class SamplerOutput:
    # One sampled token id per input row.
    token_ids: list[int]
    # Per row: logprobs when the request asked for them, else None.
    logprobs: list[SampledLogprobs | None]


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed % 2**64)
        return gen

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: [N, V] fp32, row i belongs to requests[i]."""
        raw_logprobs = None
        if any(r.sampling_params.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        rows_with_penalties = [i for i, r in enumerate(requests) if r.sampling_params.needs_penalties]
        rows_with_bias = [i for i, r in enumerate(requests) if r.sampling_params.logit_bias]
        # A grammar waits while its request thinks (engine/thinking.py).
        constrained = [i for i, r in enumerate(requests) if r.grammar is not None and not thinking.in_thinking(r)]
        forced = [i for i, r in enumerate(requests) if r.forced_token_ids]
        if rows_with_penalties or rows_with_bias or constrained or forced:
            logits = logits.clone()  # the caller's logits stay the model's
            _apply_penalties(logits, rows_with_penalties, requests)
            _apply_bias(logits, rows_with_bias, requests)
            if constrained:  # one batched mask for every constrained row
                openings = [(i, thinking.may_open(requests[i])) for i in constrained]
                openings = [(i, token, logits[i, token].clone()) for i, token in openings if token is not None]
                matchers = [requests[i].grammar for i in constrained]
                matchers[0].backend.mask(logits, constrained, matchers)
                for row, token, value in openings:  # besides the grammar's tokens, the thinking's opening
                    logits[row, token] = value
            for row in forced:  # a thinking budget spent: the closing tokens, one a step
                token = requests[row].forced_token_ids.pop(0)
                logits[row] = float("-inf")
                logits[row, token] = 0.0
        token_ids = argmax(logits)  # greedy rows: one argmax over the batch
        random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.is_greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            token_ids[rows] = self._sample(logits[rows], [requests[i] for i in random_rows])
        logprob_rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
        gathered = _gather_logprobs(raw_logprobs, token_ids, logprob_rows, requests) if logprob_rows else {}
        # The step's one host sync for the tokens (and one for the logprobs, when asked).
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=[gathered.get(i) for i in range(len(requests))])

    def verify(self, logits: torch.Tensor, request: Request, draft: list[int]) -> list[int]:
        """Speculative decoding: logits [k+1, V] at the last token and the k proposed ones;
        the accepted proposals plus one token of the model's (engine/speculative.py)."""
        if request.sampling_params.is_greedy:
            return accept_greedy(logits, draft)
        probs = target_probs(logits, [request.sampling_params] * logits.shape[0])
        return accept_sampled(probs, draft, request.generator or self.generator)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """[R] token ids drawn from the rows' distributions, without a host sync: the exponential
        race (argmax of p / E with E ~ Exp(1) i.i.d. draws exactly from p). A seeded request's
        noise comes from its own generator, so its text does not depend on the batch; the
        others share the sampler's."""
        probs = target_probs(logits, [r.sampling_params for r in requests])
        noise = torch.empty_like(probs)
        shared = [i for i, r in enumerate(requests) if r.generator is None]
        if shared:
            noise[torch.tensor(shared, device=probs.device)] = torch.empty(
                len(shared), probs.shape[-1], device=probs.device).exponential_(generator=self.generator)
        for i, request in enumerate(requests):
            if request.generator is not None:
                noise[i].exponential_(generator=request.generator)
        # (a zero draw would make 0 / 0 = NaN, which argmax takes as the largest)
        sampled = (probs / noise.clamp_(min=1e-30)).argmax(dim=-1)
        # A row with nothing to sample from (no parameters lead there, but a request's row must
        # never fail the step of every request in the batch) takes its most likely token.
        valid = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
        fallback = torch.nan_to_num(logits, nan=float("-inf")).argmax(dim=-1)
        return torch.where(valid, sampled, fallback)


def target_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """[R, V] logits -> the distribution each row samples from: temperature, top-k/p, min-p
    (unnormalized after the cuts; multinomial normalizes)."""
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        probs = _top_k_top_p(probs, params)
    min_p = torch.tensor([p.min_p for p in params], device=logits.device)
    if bool((min_p > 0).any()):
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _top_k_top_p(probs: torch.Tensor, params) -> torch.Tensor:
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    vocab = probs.shape[-1]
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=probs.device)
    top_p = torch.tensor([p.top_p for p in params], device=probs.device)
    ranks = torch.arange(vocab, device=probs.device)[None, :]
    # Keep a token while the mass before it is below top_p, and the top token always (a top_p
    # of 1e-300 is 0.0 in float32, and 0 >= 0 would drop it too).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (ranks >= top_k[:, None]) | (mass_before >= top_p[:, None])
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, sorted_ids, sorted_probs)


def _apply_penalties(logits: torch.Tensor, rows: list[int], requests: list[Request]) -> None:
    """In place on logits[rows]: repetition (prompt + output), presence and frequency (output)."""
    vocab = logits.shape[-1]
    for row in rows:
        request = requests[row]
        params = request.sampling_params
        output = torch.tensor(request.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(output, minlength=vocab)[:vocab].to(logits.dtype)
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(request.all_token_ids, dtype=torch.long, device=logits.device).unique()
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / params.repetition_penalty,
                                            values * params.repetition_penalty)
        logits[row] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def _apply_bias(logits: torch.Tensor, rows: list[int], requests: list[Request]) -> None:
    """In place: OpenAI's logit_bias (ids checked against the vocabulary when the request came in)."""
    for row in rows:
        bias = requests[row].sampling_params.logit_bias
        ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
        logits[row, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)


def _gather_logprobs(raw_logprobs: torch.Tensor, token_ids: torch.Tensor, rows: list[int],
                     requests: list[Request]) -> dict[int, SampledLogprobs]:
    """Per row that asked: the sampled token's logprob and its top n, gathered in one op each."""
    index = torch.tensor(rows, device=raw_logprobs.device)
    row_logprobs = raw_logprobs[index]
    chosen = row_logprobs.gather(1, token_ids[index][:, None]).squeeze(1).tolist()
    num_top = [requests[i].sampling_params.logprobs for i in rows]
    top_values, top_ids = [[]] * len(rows), [[]] * len(rows)
    if max(num_top) > 0:
        values, ids = row_logprobs.topk(max(num_top), dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    return {row: SampledLogprobs(logprob=chosen[n], top_ids=top_ids[n][:num_top[n]],
                                 top_logprobs=top_values[n][:num_top[n]])
            for n, row in enumerate(rows)}
