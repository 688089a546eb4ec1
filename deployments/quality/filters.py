"""Output filters: post-processing applied to every output before it reaches the client.

`quality.filters` in the config is a chain, applied in order:

- `blocklist`: phrases (case-insensitive, whitespace-tolerant) and regexes; `action:
  replace` writes `replacement` over each match, `refuse` cuts the output where the
  first match begins and ends it with finish_reason "content_filter".
- `pii`: e-mail addresses, phone numbers and payment card numbers (Luhn-checked) masked
  with `[email]`, `[phone]`, `[card]` (or `replacement`).
- `max_length`: the output is cut at `max_chars` characters ("content_filter").
- `classifier`: a Python callable by import path ("package.module:function") run on the
  whole text; it returns True / a score (flagged at >= `threshold`); a flagged output is
  withheld ("content_filter"; when streaming, the stream stops where it is).

Streaming stays safe: text is held back only while a match may still be in progress
(a pattern's partial match at the end of the text so far, found with the `regex`
module's partial matching, or a match that reaches the end and could grow); everything
before it is filtered and sent. Hits are counted per filter (and per model and arm, by
the caller's metrics).
"""

from __future__ import annotations

import importlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import regex

_PII = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "phone": r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}(?![\w])",
    "card": r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)",
}


@dataclass
class FilterResult:
    text: str
    stopped: bool = False  # the output ends here: finish_reason "content_filter"
    hits: Counter = field(default_factory=Counter)


class _Pattern:
    """A filter that rewrites or refuses regex matches."""

    def __init__(self, name: str, pattern: "regex.Pattern", refuse: bool, replace: Callable[[str], str | None]) -> None:
        self.name, self.pattern, self.refuse, self.replace = name, pattern, refuse, replace

    def apply(self, text: str, result: FilterResult) -> str:
        out, last = [], 0
        for match in self.pattern.finditer(text):
            replacement = self.replace(match.group())
            if replacement is None:  # not a hit after all (a card number failing Luhn)
                continue
            result.hits[self.name] += 1
            if self.refuse:
                result.stopped = True
                out.append(text[last:match.start()])
                return "".join(out)
            out += [text[last:match.start()], replacement]
            last = match.end()
        out.append(text[last:])
        return "".join(out)

    def cut_before(self, text: str, ready: int) -> int:
        """`ready`, moved back to the start of the first match that may still grow (partial, or
        reaching the end of the text) or that runs past it."""
        for match in self.pattern.finditer(text, partial=True):
            if match.start() >= ready:
                break
            if match.partial or match.end() == len(text) or match.end() > ready:
                return match.start()
        return ready


class FilterChain:
    def __init__(self, settings: list) -> None:
        self.patterns: list[_Pattern] = []
        self.max_chars: int | None = None
        self.classifiers: list[tuple[str, Callable, float]] = []
        for s in settings:
            name = s.name or s.type
            if s.type == "blocklist":
                parts = [r"\s+".join(regex.escape(word) for word in phrase.split()) for phrase in s.phrases]
                parts = [f"(?i:{p})" for p in parts] + [f"(?:{p})" for p in s.patterns]
                replacement = s.replacement
                self.patterns.append(_Pattern(name, regex.compile("|".join(parts)), s.action == "refuse",
                                              lambda _, r=replacement: r))
            elif s.type == "pii":
                for kind in sorted(set(s.kinds)):  # card before phone: a card number holds phone-like runs
                    mask = s.replacement if s.replacement is not None else f"[{kind}]"
                    check = _luhn if kind == "card" else (lambda _: True)
                    self.patterns.append(_Pattern(f"{name}:{kind}", regex.compile(_PII[kind]), False,
                                                  lambda text, m=mask, c=check: m if c(text) else None))
            elif s.type == "max_length":
                self.max_chars = s.max_chars if self.max_chars is None else min(self.max_chars, s.max_chars)
            else:
                self.classifiers.append((name, load_callable(s.callable), s.threshold))

    def __bool__(self) -> bool:
        return bool(self.patterns or self.max_chars is not None or self.classifiers)

    def apply(self, text: str, sent_before: str = "") -> FilterResult:
        """Filter `text`, which follows `sent_before` (already filtered and sent)."""
        result = FilterResult(text)
        for pattern in self.patterns:
            result.text = pattern.apply(result.text, result)
            if result.stopped:
                break
        if self.max_chars is not None and len(sent_before) + len(result.text) > self.max_chars:
            result.text = result.text[:max(0, self.max_chars - len(sent_before))]
            result.stopped = True
            result.hits["max_length"] += 1
        for name, classify, threshold in self.classifiers:
            verdict = classify(sent_before + result.text)
            if verdict is True or (not isinstance(verdict, bool) and verdict is not None and verdict >= threshold):
                result.hits[name] += 1
                result.text, result.stopped = "", True
                break
        return result

    def stream(self) -> "StreamFilter":
        return StreamFilter(self)


class StreamFilter:
    """One streamed output through the chain: feed deltas, get what may be sent now."""

    def __init__(self, chain: FilterChain) -> None:
        self.chain = chain
        self.pending = ""  # received, not yet sent (a match may be in progress in it)
        self.sent = ""  # filtered text sent so far
        self.stopped = False
        self.hits: Counter = Counter()

    def feed(self, delta: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.pending += delta
        ready = len(self.pending)
        if not final:  # until no pattern's match is cut: one's partial match may split another's
            settled = None
            while settled != ready:
                settled = ready
                for pattern in self.chain.patterns:
                    ready = pattern.cut_before(self.pending, ready)
        if ready == 0 and not final:
            return ""
        result = self.chain.apply(self.pending[:ready], self.sent)
        self.pending = self.pending[ready:]
        self.hits.update(result.hits)
        self.sent += result.text
        self.stopped = result.stopped
        return result.text


def load_callable(path: str) -> Callable:
    """"package.module:function" -> the function (a ValueError naming what is wrong)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"a classifier is 'package.module:function', got {path!r}")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load the classifier {path!r}: {exc}") from exc
    if not callable(function):
        raise ValueError(f"the classifier {path!r} is not callable")
    return function


def _luhn(text: str) -> bool:
    digits = [int(c) for c in re.sub(r"\D", "", text)]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0
