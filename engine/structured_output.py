"""Constrained decoding: the next token is drawn only from those a grammar allows.

A request's `SamplingParams.structured_output` names one grammar (a JSON schema,
any JSON object, a regular expression, a choice of strings, or an EBNF grammar).
xgrammar compiles it against the tokenizer's vocabulary once (its compiler caches
compiled grammars, bounded in bytes); each request then walks it with its own
matcher. In a step, every constrained row's allowed tokens are written into one
batched bitmask and applied to the logits in one call, so constrained and free rows
share the step. (xgrammar over llguidance: on the embedded model's 49k vocabulary
its per-token mask took ~10 us against ~80 us, which is what the step waits on.)
"""

from __future__ import annotations

import json
import logging
import threading

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

# Compiled grammars kept by the compiler (bytes); each also holds per-token tables.
GRAMMAR_CACHE_BYTES = 256 * 2**20


# JSON output is laid out compactly (", " and ": "), with no free whitespace: a small model
# left free to emit whitespace can loop on it until max_tokens.
JSON_LAYOUT = {"any_whitespace": False, "strict_mode": True}


class GrammarError(ValueError):
    """The grammar, schema or pattern cannot be compiled."""


class StructuredOutput(BaseModel):
    """Exactly one of the fields: what the output must match."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: dict | None = Field(None, description="A JSON Schema the output must validate against.")
    json_object: bool = Field(False, description="Any JSON object.")
    regex: str | None = Field(None, description="A regular expression the whole output matches.")
    choice: list[str] | None = Field(None, min_length=1, description="The output is one of these strings.")
    grammar: str | None = Field(None, description="An EBNF grammar (GBNF/xgrammar dialect, rule `root`).")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured_output takes exactly one of json_schema, json_object, regex, "
                             f"choice, grammar (got {given or 'none'})")
        return self

    def key(self) -> str:
        return json.dumps(self.model_dump(exclude_defaults=True), sort_keys=True)


class GrammarBackend:
    """Compiles StructuredOutputs for one tokenizer and vocabulary; thread-safe (requests
    are compiled by their callers' threads, off the engine's step)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
        self._lock = threading.Lock()
        self._bitmask: torch.Tensor | None = None

    def compile(self, spec: StructuredOutput):
        """The compiled grammar for `spec` (cached by the compiler). Raises GrammarError."""
        try:
            with self._lock:
                if spec.json_schema is not None:
                    return self._compiler.compile_json_schema(json.dumps(spec.json_schema), **JSON_LAYOUT)
                if spec.json_object:
                    return self._compiler.compile_json_schema('{"type": "object"}', **JSON_LAYOUT)
                if spec.regex is not None:
                    return self._compiler.compile_regex(spec.regex)
                if spec.choice is not None:
                    return self._compiler.compile_grammar(
                        "root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
                return self._compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(f"invalid structured output ({spec.key()[:200]}): {exc}") from exc

    def matcher(self, compiled) -> "GrammarMatcher":
        return GrammarMatcher(self, self._xgr.GrammarMatcher(compiled))

    def mask(self, logits: torch.Tensor, rows: list[int], matchers: list["GrammarMatcher"]) -> None:
        """Forbid, in place, every token `matchers[i]` disallows in logits row `rows[i]`."""
        xgr = self._xgr
        batch = logits.shape[0]
        if self._bitmask is None or self._bitmask.shape[0] < batch:
            self._bitmask = xgr.allocate_token_bitmask(max(batch, 8), self.vocab_size)
        bitmask = self._bitmask[:batch]
        for row, matcher in zip(rows, matchers):
            matcher.inner.fill_next_token_bitmask(bitmask, row)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=self.vocab_size, indices=rows)


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, backend: GrammarBackend, inner) -> None:
        self.backend, self.inner = backend, inner

    def accept(self, token_id: int) -> None:
        if not self.try_accept(token_id):
            raise GrammarError(f"token {token_id} does not continue the grammar")

    def try_accept(self, token_id: int) -> bool:
        """Take the token if the grammar allows it (else nothing changes)."""
        return self.inner.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        return self.inner.is_terminated()
