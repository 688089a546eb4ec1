"""Offline batch inference on a Ray cluster, as a Ray job: OpenAI batch JSONL in, OpenAI batch output out.

    python -m deployments.batch.job --input in.jsonl --output out.jsonl [--num-replicas N] [--batch-size B]

The driver reads and checks the input with the serving batch lane's parser (bad
lines become error records, as in the Batch API), then Ray Data streams the good
lines through a pool of engine actors (`map_batches` over an ActorPoolStrategy).
Each actor owns one LLM server (the same class Serve runs, without a router) and
answers lines with the same OpenAIServing code as the batch lane, so request
validation and response bodies are identical to the HTTP API's. Outputs are
written in input order: successes to --output, failures to --errors (default:
OUTPUT with .errors.jsonl), one record per input line.

Paths may be local files or any URI pyarrow opens (s3://, gs://, ...).
`semline job submit` submits this through Ray's Jobs API and fetches the files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid

import numpy as np

from deployments.batch.runner import answer_line, parse_input, record_kind, result_record
from deployments.config import SemlineConfig
from deployments.api.admission import LocalLimits
from deployments.api.errors import APIError
from deployments.api.serving import ENDPOINTS, OpenAIServing

logger = logging.getLogger(__name__)

# Lines of stdout that carry a result file when the job is asked to echo them
# (`semline job submit` reads them from the job's log: no shared storage needed).
ECHO_PREFIX = "@@semline-result@@ "


class LocalServing(OpenAIServing):
    """OpenAIServing over an in-process LLM server: no router, no Serve handle.
    The actor pool is the admission control: each actor runs the lines it is given, within its
    share of the tenant's limits (limits: (max_inflight, tokens_per_minute) for this actor)."""

    def __init__(self, llm, config: SemlineConfig, limits: tuple[int | None, int | None] = (None, None)) -> None:
        self.limits = limits
        super().__init__(llm, config)

    def _admission(self, router) -> LocalLimits:
        return LocalLimits(*self.limits)

    def _call(self, method: str, choice, priority: int, plan, stream: bool = False):
        call = getattr(self.llm, method)(choice.prompt, choice.messages, choice.params, priority, uuid.uuid4().hex,
                                         tools=plan.tools, announce=stream, lora=plan.target.lora)
        return call if stream else asyncio.ensure_future(call)

    async def _server_call(self, method: str, *args):
        return await getattr(self.llm, method)(*args)

    async def _refresh_catalog(self) -> None:
        pass  # no router: the configuration's adapters and experiments are all there is


class EngineWorker:
    """One engine replica in the actor pool: answers a batch of lines concurrently
    (the engine's continuous batching runs them together)."""

    def __init__(self, config: dict, endpoint: str, num_threads: int, key: str | None = None,
                 limits: tuple[int | None, int | None] = (None, None)) -> None:
        from deployments.llm_server import LLMServer

        self.config = SemlineConfig.model_validate(config)
        self.endpoint, self.key = endpoint, key
        self.loop = asyncio.new_event_loop()
        server = LLMServer(self.config.engine, num_threads, model_name=self.config.model_name,
                           parallel_config=self.config.parallel,
                           tool_call_parser=self.config.http.tool_call_parser)
        self.serving = LocalServing(server, self.config, limits)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bodies = [json.loads(b) for b in batch["body"]]
        results = self.loop.run_until_complete(self._answer_all(bodies))
        records = [json.dumps(result_record(cid, response, None), ensure_ascii=False)
                   for cid, response in zip(batch["custom_id"], results)]
        return {"line_no": batch["line_no"], "record": np.array(records, dtype=object)}

    async def _answer_all(self, bodies: list[dict]) -> list[tuple[int, dict]]:
        return await asyncio.gather(*(self._answer(body) for body in bodies))

    async def _answer(self, body: dict) -> tuple[int, dict]:
        try:
            return await answer_line(self.serving, self.endpoint, body, self.key)
        except APIError as exc:  # nothing to retry against offline: the error is the answer
            return exc.status, exc.body()


def _open(path: str, mode: str):
    """A local path or a URI pyarrow understands (s3://, gs://, hdfs://)."""
    if "://" not in path:
        return open(path, mode + "b")
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path)
    return filesystem.open_input_stream(inner) if mode == "r" else filesystem.open_output_stream(inner)


def _first_url(data: bytes) -> str:
    for raw in data.splitlines():
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(item, dict) and item.get("url") in ENDPOINTS:
            return item["url"]
    return "/v1/chat/completions"


def tenant_share(config: SemlineConfig, name: str | None, actors: int) -> tuple[str | None, tuple]:
    """The job's tenant: the key its lines are counted under (its priority range, the tenant
    metrics, its ownership) and each actor's share of its limits (max_inflight,
    tokens_per_minute). No tenant: the 'default' tenant's, unlimited. ValueError: not in the config."""
    if name is None:
        return None, (None, None)
    tenant = config.tenant(name)
    if tenant is None:
        known = ", ".join(t.name for t in config.tenants) or "none"
        raise ValueError(f"tenant {name!r} is not in the config (its tenants: {known})")
    share = [None if limit is None else max(1, -(-limit // actors))
             for limit in (tenant.max_inflight, tenant.tokens_per_minute)]
    return tenant.limit_key, tuple(share)


def run(args: argparse.Namespace) -> dict:
    """Run the job; returns a summary {total, completed, failed, output, errors, tenant}."""
    import ray

    config = SemlineConfig.from_yaml(args.config) if args.config else SemlineConfig()
    key, limits = tenant_share(config, args.tenant, args.num_replicas)
    with _open(args.input, "r") as f:
        data = f.read()
    endpoint = args.endpoint or _first_url(data)
    lines = parse_input(data, endpoint)
    records: dict[int, dict] = {line.line_no: result_record(line.custom_id, None, line.error)
                                for line in lines if line.error is not None}
    todo = [{"line_no": line.line_no, "custom_id": line.custom_id, "body": json.dumps(line.body)}
            for line in lines if line.error is None]
    print(f"{len(lines)} requests to {endpoint}: {len(todo)} to run, {len(records)} rejected", flush=True)

    if todo:
        ray.init(address=args.address, ignore_reinit_error=True, logging_level=logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the job reports its own progress lines
        num_cpus = args.num_cpus if args.num_cpus is not None else config.server.num_cpus
        num_gpus = args.num_gpus if args.num_gpus is not None else config.server.num_gpus
        dataset = ray.data.from_items(todo, override_num_blocks=max(1, len(todo) // args.batch_size)).map_batches(
            EngineWorker,
            fn_constructor_kwargs={"config": config.model_dump(mode="json", exclude={"kubernetes"}),
                                   "endpoint": endpoint, "num_threads": int(max(1, num_cpus)),
                                   "key": key, "limits": limits},
            compute=ray.data.ActorPoolStrategy(size=args.num_replicas),
            batch_size=args.batch_size, num_cpus=num_cpus, num_gpus=num_gpus)
        start, last = time.monotonic(), 0.0
        for row in dataset.iter_rows():
            records[int(row["line_no"])] = json.loads(row["record"])
            now = time.monotonic()
            if now - last > 5 or len(records) == len(lines):
                print(f"progress: {len(records)}/{len(lines)} lines ({now - start:.0f} s)", flush=True)
                last = now

    ordered = [records[line.line_no] for line in lines]
    outputs = [r for r in ordered if record_kind(r) == "output"]
    errors = [r for r in ordered if record_kind(r) == "error"]
    errors_path = args.errors or _errors_path(args.output)
    for path, part in ((args.output, outputs), (errors_path, errors)):
        with _open(path, "w") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode())
    if args.echo_results:
        for name, part in (("output", outputs), ("errors", errors)):
            for record in part:
                print(ECHO_PREFIX + json.dumps({"file": name, "record": record}, ensure_ascii=False))
    summary = {"total": len(lines), "completed": len(outputs), "failed": len(errors),
               "output": args.output, "errors": errors_path, "tenant": args.tenant}
    print("summary: " + json.dumps(summary), flush=True)
    return summary


def _errors_path(output: str) -> str:
    return output[:-len(".jsonl")] + ".errors.jsonl" if output.endswith(".jsonl") else output + ".errors"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deployments.batch.job", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="OpenAI batch input JSONL (path or URI)")
    parser.add_argument("--output", required=True, help="OpenAI batch output JSONL (path or URI)")
    parser.add_argument("--errors", default=None, help="error records (default: OUTPUT.errors.jsonl)")
    parser.add_argument("--config", default=None, help="semline config YAML: model and engine settings")
    parser.add_argument("--endpoint", default=None, help="default: the url of the first valid line")
    parser.add_argument("--num-replicas", type=int, default=1, help="engine actors in the pool")
    parser.add_argument("--batch-size", type=int, default=64, help="lines per map_batches call")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs per engine actor (default: config)")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per engine actor (default: config)")
    parser.add_argument("--tenant", default=None, help="the config's tenant the job runs for: its priority "
                        "range, its share of max_inflight and tokens_per_minute split over the actors, "
                        "its metrics label (default: none, unlimited)")
    parser.add_argument("--address", default=None, help="Ray address (default: the job's cluster, or a new one)")
    parser.add_argument("--echo-results", action="store_true",
                        help=f"also print every record to stdout, prefixed {ECHO_PREFIX.strip()!r}")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.num_replicas < 1 or args.batch_size < 1:
        print("error: --num-replicas and --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        run(args)
    except APIError as exc:  # the file as a whole cannot run (not JSONL, duplicate custom_ids, ...)
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
