"""EleutherAI's lm-evaluation-harness scores a model served by semline as it scores the same
weights in Hugging Face transformers: `local-completions` (token-id prompts, `echo`,
`logprobs`) on a multiple-choice task whose data is a local file (no download)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.deployments.conftest import API_KEY, MODEL

QUESTIONS = [
    ("What color is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
    ("How many legs does a spider have?", ["six", "eight", "four", "ten"], 1),
    ("What do bees make?", ["milk", "silk", "honey", "wax paper"], 2),
    ("Which is the largest planet in the solar system?", ["Mars", "Venus", "Earth", "Jupiter"], 3),
    ("What is frozen water called?", ["steam", "ice", "sand", "glass"], 1),
    ("Which animal is known as the king of the jungle?", ["the lion", "the mouse", "the owl", "the frog"], 0),
    ("What is the capital of France?", ["Berlin", "Madrid", "Paris", "Rome"], 2),
    ("How many days are there in a week?", ["five", "seven", "nine", "twelve"], 1),
    ("What do plants need from the sun to grow?", ["light", "sound", "salt", "plastic"], 0),
    ("Which of these is a fruit?", ["carrot", "potato", "onion", "apple"], 3),
    ("What is two plus two?", ["three", "four", "five", "six"], 1),
    ("Which season comes after winter?", ["autumn", "summer", "spring", "winter"], 2),
]

TASK = """task: semline_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """As lm-eval splits a (context, continuation) pair into token ids for a causal model."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids):]


def _hf_loglikelihood(hf_model, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(context) - 1:-1], dim=-1)
    return float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum())


def test_lm_eval_scores_the_served_model_as_hf_does(serve_app, hf_model, hf_dir, tmp_path):
    data = tmp_path / "mc.json"
    data.write_text(json.dumps([{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "semline_mc.yaml").write_text(TASK.format(data=data))
    out = tmp_path / "out"
    model_args = (f"model={MODEL},base_url={serve_app}/v1/completions,tokenizer={hf_dir},"
                  "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=4,max_retries=1")
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
                          "--tasks", "semline_mc", "--include_path", str(tasks), "--output_path", str(out),
                          "--log_samples"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    [samples_file] = out.rglob("samples_semline_mc_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    [results_file] = out.rglob("results_*.json")
    accuracy = json.loads(results_file.read_text())["results"]["semline_mc"]["acc,none"]

    tokenizer = hf_model_tokenizer(hf_dir)
    assert len(samples) == len(QUESTIONS)
    hf_correct = 0
    for sample in samples:
        # Per choice: arguments {"arg_0": context, "arg_1": continuation}, resps [[loglikelihood, is_greedy]].
        pairs = [(args["arg_0"], args["arg_1"]) for args in sample["arguments"].values()]
        served = [float(resp[0][0]) for resp in sample["resps"]]
        ours = []
        for (context, continuation), value in zip(pairs, served, strict=True):
            hf = _hf_loglikelihood(hf_model, *_encode_pair(tokenizer, context, continuation))
            assert abs(hf - value) < 1e-3, (context, continuation, hf, value)
            ours.append(hf)
        hf_correct += int(max(range(len(ours)), key=ours.__getitem__) == int(sample["target"]))
    assert accuracy == pytest.approx(hf_correct / len(samples))


def hf_model_tokenizer(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)
