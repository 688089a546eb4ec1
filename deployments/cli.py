"""The `semline` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine import AsyncEngine, EngineConfig, SamplingParams
    from engine.llm import apply_chat_template

    engine = AsyncEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    prompt = args.prompt
    if args.chat:
        prompt = apply_chat_template(engine.tokenizer, [{"role": "user", "content": args.prompt}])

    async def stream() -> None:
        final = None
        async for output in engine.generate(prompt, params):
            sys.stdout.write(output.delta_text)
            sys.stdout.flush()
            final = output
        m = final.metrics
        print(f"\n\n[{final.finish_reason}] {m.num_prompt_tokens} prompt + {m.num_generated_tokens} generated "
              f"tokens | TTFT {m.time_to_first_token * 1000:.0f} ms | "
              f"TPOT {m.time_per_output_token * 1000:.1f} ms | "
              f"{m.flops / 1e9:.1f} GFLOP | {m.energy_joules:.2f} J ({m.energy_source})", file=sys.stderr)

    start = time.time()
    asyncio.run(stream())
    engine.shutdown()
    logging.getLogger(__name__).debug("done in %.1fs", time.time() - start)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semline", description="semline: LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text from a prompt with the local engine")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    _add_engine_args(gen)
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as exc:
        print(f"semline: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
