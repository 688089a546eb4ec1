"""`LLM`: the engine as a plain Python library call."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.loader import encode_text
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Message = dict[str, str]


class LLM:
    """Offline generation: `LLM(model=None, **config).generate(prompts, sampling_params)`.

    Keyword arguments are EngineConfig fields; unknown ones raise ConfigError. Close it
    (`close()`, or `with LLM(...) as llm:`) to give back what it holds at once: Ray workers
    and their placement group when the model is split, the KV cache and the weights. An
    engine collected unclosed gives them back then, with a ResourceWarning.
    """

    def __init__(self, model: str | None = None, executor=None, **config) -> None:
        """config: EngineConfig's fields; executor: where the model runs (default: this process;
        cluster.executors.ray_executor for pipeline stages on Ray)."""
        self.engine = LLMEngine(EngineConfig.from_dict({"model": model, **config}), executor)
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        """Release the engine's workers, KV cache and weights now. Idempotent."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: int | Sequence[int] = 0,
        lora: str | None | Sequence[str | None] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run prompts (texts or token-id lists) to completion; outputs in input order.
        lora: a LoRA adapter's name (see add_lora), or one per prompt (None: the base model).
        use_tqdm: a progress bar (prompts done, prompt and output tokens/s) on stderr while it
        is a terminal; False: none."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        # Only each request's end is read here: no intermediate outputs are built.
        params = [p.model_copy(update={"output_kind": "final_only"})
                  for p in _per_prompt(sampling_params or self.engine.default_sampling_params(), len(prompts),
                                       "sampling_params")]
        priorities = _per_prompt(priority, len(prompts), "priority")
        loras = _per_prompt(lora, len(prompts), "lora")
        request_ids = [
            self.engine.add_request(p, sp, priority=pr, lora=name).request_id
            for p, sp, pr, name in zip(prompts, params, priorities, loras)
        ]
        progress = _Progress(len(request_ids), self.engine.stats) if use_tqdm else None
        finished: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished_requests():
                outputs = self.engine.step()
                for output in outputs:
                    if output.finished:
                        finished[output.request_id] = output
                if progress is not None:
                    progress.update(outputs)
        finally:
            if progress is not None:
                progress.close()
        return [finished[rid] for rid in request_ids]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def add_lora(self, name: str, path: str) -> None:
        """Serve the PEFT LoRA folder `path` under `name` (needs enable_lora or lora_modules)."""
        self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        return apply_chat_template(self.tokenizer, messages, add_generation_prompt)

    @property
    def config(self) -> EngineConfig:
        return dataclasses.replace(self.engine.config)


def apply_chat_template(tokenizer, messages: list[Message], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
    """Prompt token ids of a conversation (tools passed to templates that take them;
    template_kwargs: more variables for the template, e.g. enable_thinking, and the prompt's end:
    add_generation_prompt, continue_final_message, which override the arguments)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template")
    kwargs = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
    # A serving layer's options for the prompt's end travel with the template's variables.
    add_generation_prompt = kwargs.pop("add_generation_prompt", add_generation_prompt)
    continue_final_message = kwargs.pop("continue_final_message", False)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except Exception as exc:  # noqa: BLE001 - jinja's errors (a template's raise_exception) are the request's
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"the chat template cannot render these messages: {exc}") from exc
    return encode_text(tokenizer, text)


class _Progress:
    """A tqdm bar over a generate call: prompts finished, and the prompt and output tokens/s
    so far. tqdm's own rule decides where it shows: on stderr while that is a terminal."""

    def __init__(self, num_prompts: int, stats) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=num_prompts, desc="Processed prompts", unit="prompt", dynamic_ncols=True,
                        disable=None)
        self.stats, self.start = stats, time.perf_counter()  # the engine's counters, read as they grow
        self.first_prompt_tokens, self.first_output_tokens = stats.num_prompt_tokens, stats.num_generation_tokens

    def update(self, outputs: list[RequestOutput]) -> None:
        if self.bar.disable:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        prompt_tokens = self.stats.num_prompt_tokens - self.first_prompt_tokens
        output_tokens = self.stats.num_generation_tokens - self.first_output_tokens
        self.bar.set_postfix_str(f"input: {prompt_tokens / elapsed:.0f} tok/s, "
                                 f"output: {output_tokens / elapsed:.0f} tok/s", refresh=False)
        self.bar.update(sum(o.finished for o in outputs))

    def close(self) -> None:
        self.bar.close()


def _per_prompt(value, count: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
        return list(value)
    return [value] * count
