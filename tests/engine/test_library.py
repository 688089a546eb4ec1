"""`LLM` as a library: it lets go of its memory when closed, runs a GGUF file as the server
does, and shows a progress bar on a terminal."""

from __future__ import annotations

import fcntl
import gc
import io
import os
import select
import struct
import sys
import termios
import weakref

import pytest
import torch

from engine import LLM, EngineConfig, RequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_close_lets_go_of_the_weights_and_the_kv_cache(make_llm):
    llm = make_llm(num_kv_blocks=16)
    runner = llm.engine.runner
    weights, cache = weakref.ref(runner.model.embed_tokens.weight), weakref.ref(runner.kv_caches[0][0])
    assert len(llm.generate("The sea is", GREEDY, use_tqdm=False)[0].token_ids) == 6
    llm.engine.add_request("left unfinished", GREEDY)
    llm.close()
    gc.collect()
    assert weights() is None and cache() is None
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()
    with pytest.raises(RequestError, match="closed"):
        llm.generate("The sea is", GREEDY)
    llm.close()  # idempotent


def test_unclosed_llm_is_released_when_collected_with_a_warning(make_llm):
    llm = make_llm(num_kv_blocks=16)
    weights = weakref.ref(llm.engine.runner.model.embed_tokens.weight)
    with pytest.warns(ResourceWarning, match="close"):
        del llm
        gc.collect()
    assert weights() is None


def test_an_engine_still_in_use_outlives_its_llm(make_llm):
    """`LLM(...).engine` handed on (to an AsyncEngine, say) stays open: the engine is what
    is released when collected, not the wrapper."""
    engine = make_llm(num_kv_blocks=16).engine
    gc.collect()
    assert not engine.is_closed
    engine.add_request("still served", GREEDY)
    while engine.has_unfinished_requests():
        outputs = engine.step()
    assert outputs[-1].finished and len(outputs[-1].token_ids) == 6
    engine.close()


def test_context_manager_closes_and_a_closed_llm_is_not_warned_about(make_llm, recwarn):
    with make_llm(num_kv_blocks=16) as llm:
        engine = llm.engine
    assert engine.is_closed
    del llm
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]


def test_a_gguf_runs_its_own_quantization_by_default():
    """`quantization` defaults to auto: the embedded GGUF's 4-bit layers, as `semline serve`."""
    from engine.quantization import CpuInt4Linear

    assert EngineConfig().quantization == "auto"
    with LLM(num_kv_blocks=16) as llm:
        runner = llm.engine.runner
        assert sum(isinstance(m, CpuInt4Linear) for m in runner.model.modules()) == 4 * runner.args.num_layers


def test_library_and_server_defaults_give_the_same_greedy_tokens():
    """`LLM()` and the LLM server of `semline serve` without a config (SemlineConfig()) run the
    embedded model the same way: same quantization, same tokens."""
    import asyncio

    from deployments.config import SemlineConfig
    from deployments.llm_server import LLMServer

    config = SemlineConfig()  # what `semline serve` runs without --config
    prompt = "Write one sentence about the moon."
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with LLM() as llm:
        want = llm.generate(prompt, params, use_tqdm=False)[0].token_ids
        assert llm.config.quantization == config.engine_config().quantization == "auto"
    server = LLMServer(config.engine, torch.get_num_threads(), model_name=config.model_name)
    try:
        assert server.engine.engine.config.quantization == "auto"

        async def run():
            final = None
            async for output in server.generate(prompt, None, params, 0, "defaults"):
                final = output
            return final.token_ids

        assert asyncio.run(run()) == want
    finally:
        server.engine.shutdown()
    assert server.engine.engine.is_closed  # the server's own engine is let go with it


def _generate_with_stderr(llm, stream, **kwargs) -> None:
    saved = sys.stderr
    sys.stderr = stream
    try:
        llm.generate([f"Prompt {i}:" for i in range(3)], GREEDY, **kwargs)
    finally:
        sys.stderr = saved
        stream.flush()


def _read_all(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        data = os.read(fd, 65536)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_only(llm):
    main, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a 160-column terminal
    terminal = os.fdopen(secondary, "w")
    try:
        _generate_with_stderr(llm, terminal)
        shown = _read_all(main)
        assert "Processed prompts" in shown and "3/3" in shown and "output:" in shown and "tok/s" in shown
        _generate_with_stderr(llm, terminal, use_tqdm=False)
        assert "Processed prompts" not in _read_all(main)
    finally:
        terminal.close()
        os.close(main)
    piped = io.StringIO()  # not a terminal (a log file, a pipe): no bar
    _generate_with_stderr(llm, piped)
    # (Ray's driver forwards its actors' log lines to stderr when a cluster of the session runs)
    assert [line for line in piped.getvalue().splitlines() if "pid=" not in line] == []


def test_the_model_folders_generation_config_sets_defaults_and_eos(llm, hf_dir, tmp_path):
    """A folder's generation_config.json (vLLM's generation_config auto): its sampling settings
    are the defaults of requests that set none, its eos_token_id ends outputs; "none" ignores it."""
    import json

    prompt = "The capital of France is"
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=False)
    [plain] = llm.generate([prompt], greedy, use_tqdm=False)
    cut = next(i for i, t in enumerate(plain.token_ids) if i > 0 and t not in plain.token_ids[:i])
    stop_at = plain.token_ids[cut]
    folder = tmp_path / "model"
    folder.mkdir()
    for item in hf_dir.iterdir():
        if item.name != "generation_config.json":
            (folder / item.name).symlink_to(item)
    (folder / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.5, "top_k": 5, "max_new_tokens": 7, "eos_token_id": [2, stop_at]}))
    base = {"dtype": "float32", "quantization": "none", "kv_cache_memory_gb": 0.1}
    with LLM(str(folder), **base) as own:
        assert own.engine.default_sampling_params() == SamplingParams(temperature=0.5, top_k=5, max_tokens=7)
        [stopped] = own.generate([prompt], greedy, use_tqdm=False)
        assert stopped.token_ids == plain.token_ids[:cut + 1] and stopped.finish_reason == "stop"
        [defaulted] = own.generate([prompt], use_tqdm=False)
        assert 0 < len(defaulted.token_ids) <= 7
    with LLM(str(folder), generation_config="none", **base) as ignoring:
        assert ignoring.engine.default_sampling_params() == SamplingParams()
        [whole] = ignoring.generate([prompt], greedy, use_tqdm=False)
        assert whole.token_ids == plain.token_ids


def test_a_chat_template_from_the_config_replaces_the_models(make_llm, tmp_path):
    """chat_template (vLLM's --chat-template): a file's path or the template itself."""
    from engine.llm import apply_chat_template
    from engine.loader import read_chat_template

    template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}ANSWER:"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    assert read_chat_template(template) == template
    with make_llm(chat_template=str(path), kv_cache_memory_gb=0.05) as llm:
        ids = apply_chat_template(llm.tokenizer, [{"role": "user", "content": "Hi there"}])
        assert llm.tokenizer.decode(ids) == "<<user>>Hi there\nANSWER:"
    with pytest.raises(Exception, match="chat_template: cannot read"):
        make_llm(chat_template=str(tmp_path / "missing.jinja"))
