"""Reasoning models' thinking, apart from their answer.

Qwen3- and DeepSeek-R1-style models write their reasoning between `<think>` and `</think>`
before the answer. As vLLM, SGLang and llama.cpp do, the chat API returns it apart
(`message.reasoning_content`, and vLLM's newer `reasoning`; streamed as deltas of the same
names before the content's), the Responses API as a `reasoning` output item; tool calls and
output filters read the answer only. Two styles:

- `deepseek_r1`: the chat template opens `<think>` itself, so the output starts inside the
  reasoning (an opening tag the model writes anyway is skipped); without `</think>`, all of
  it is reasoning (the model was still thinking when it stopped).
- `qwen3`: the model opens `<think>` itself (Qwen3's template writes an empty block when
  thinking is off: `chat_template_kwargs: {"enable_thinking": false}`); an output that does
  not begin with `<think>` is all answer.

One splitter serves both the streamed and the whole answer (the whole answer is a stream of
one piece), so the two always agree, a `</think>` split across chunks included.
"""

from __future__ import annotations

from deployments.api.tools import held_back

THINK_START, THINK_END = "<think>", "</think>"
REASONING_PARSERS = ("deepseek_r1", "qwen3")


def parser_for_template(chat_template: str | None) -> str | None:
    """`auto`: the style of a chat template that mentions thinking, else none."""
    template = chat_template or ""
    if THINK_END not in template and THINK_START not in template:
        return None
    return "qwen3" if "enable_thinking" in template else "deepseek_r1"


def resolve_reasoning_parser(tokenizer, configured: str) -> str | None:
    if configured == "auto":
        return parser_for_template(getattr(tokenizer, "chat_template", None))
    return None if configured == "none" else configured


def thinking_tokens(tokenizer, style: str | None) -> dict | None:
    """The token ids that open (qwen3; deepseek_r1: None, the template opens it) and close a
    model's thinking: what a thinking budget forces and counts from (SamplingParams)."""
    if style is None:
        return None
    from engine.loader import encode_text

    return {"start": encode_text(tokenizer, THINK_START) if style == "qwen3" else None,
            "end": encode_text(tokenizer, THINK_END)}


class ReasoningSplitter:
    """One answer's text as it comes: feed(delta) -> (reasoning delta, answer delta)."""

    def __init__(self, style: str) -> None:
        if style not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {style!r}; known: {', '.join(REASONING_PARSERS)}")
        self.style = style
        self.text, self.sent = "", 0
        self.phase = "open"  # "open": not yet known whether it opens with <think>; "reasoning"; "answer"
        self.reasoned = False  # some of it was reasoning (the reasoning field is then present)

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        if self.phase == "open":
            if not final and len(self.text) < len(THINK_START) and THINK_START.startswith(self.text):
                return "", ""  # could still become <think>
            if self.text.startswith(THINK_START):
                self.sent, self.phase = len(THINK_START), "reasoning"
            else:
                self.phase = "reasoning" if self.style == "deepseek_r1" else "answer"
            self.reasoned = self.phase == "reasoning"
        reasoning = ""
        if self.phase == "reasoning":
            end = self.text.find(THINK_END, self.sent)
            if end < 0:  # the end tag may be arriving: hold back what could be its beginning
                ready = len(self.text) if final else len(self.text) - held_back(self.text, THINK_END)
                reasoning, self.sent = self.text[self.sent:ready], max(self.sent, ready)
                return reasoning, ""
            reasoning, self.sent, self.phase = self.text[self.sent:end], end + len(THINK_END), "answer"
        answer, self.sent = self.text[self.sent:], len(self.text)
        return reasoning, answer


def split_reasoning(style: str, text: str) -> tuple[str | None, str]:
    """(the reasoning, or None when there is none, and the answer) of a whole output."""
    splitter = ReasoningSplitter(style)
    reasoning, answer = splitter.feed(text, final=True)
    return (reasoning if splitter.reasoned else None), answer
