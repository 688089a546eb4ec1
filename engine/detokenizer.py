"""Incremental detokenization and stop strings.

Decoding one token at a time can split a multi-byte character across tokens
(the tokenizer then yields U+FFFD) and, for SentencePiece vocabularies, loses
the space a token carries when decoded alone. So each new token is decoded
together with a short window of the tokens before it, and text is released only
once it no longer ends in a partial character. While stop strings are set, the
last (longest stop - 1) characters are held back so that a stop string split
over several tokens never reaches a stream.
"""

from __future__ import annotations

# Prompt tokens used as context for decoding the first output token.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        context = prompt_token_ids[-_CONTEXT_TOKENS:]
        self.tokens: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        # Full decoded output text (after stop-string truncation, once stopped).
        self.text = ""
        # Characters of `text` already handed out as deltas.
        self.num_emitted = 0

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str | None:
        """Append one token. Returns the stop string hit, if any (text is then truncated)."""
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None  # wait for the rest of a multi-byte character
        search_from = max(0, len(self.text) - self.holdback)
        self.text += new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        return self._truncate_at_stop(search_from)

    def _truncate_at_stop(self, search_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.text.find(stop, search_from)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]

    def flush(self) -> str | None:
        """At the end: release text still waiting for the rest of a character."""
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        if len(new_text) <= len(prefix_text):
            return None
        search_from = max(0, len(self.text) - self.holdback)
        self.text += new_text[len(prefix_text) :]
        return self._truncate_at_stop(search_from)

    def take_delta(self, finished: bool) -> str:
        """Text not yet emitted; while running, minus the stop-string holdback."""
        end = len(self.text) if finished or not self.stop else max(self.num_emitted, len(self.text) - self.holdback)
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta
