"""The `semline` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
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


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from deployments.app import build_app
    from deployments.config import SemlineConfig

    config = SemlineConfig.from_yaml(args.config) if args.config else SemlineConfig()
    if args.port:
        config.http.port = args.port
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": config.http.host, "port": config.http.port},
                logging_config=LoggingConfig(enable_access_log=False))
    serve.run(build_app(config), name="semline", route_prefix="/")
    url = f"http://{config.http.host}:{config.http.port}"
    print(f"semline is serving {config.model_name} at {url}  (Ctrl-C to stop)\n"
          f"try:\n  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
          f"    -d '{{\"model\": \"{config.model_name}\", \"messages\": [{{\"role\": \"user\", "
          f"\"content\": \"Hello!\"}}]}}'", flush=True)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` stops as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
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
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible API on a local Ray cluster")
    srv.add_argument("--config", default=None, help="YAML config (see deployments/config.py)")
    srv.add_argument("--port", type=int, default=None, help="override http.port")
    srv.set_defaults(func=_cmd_serve)
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
