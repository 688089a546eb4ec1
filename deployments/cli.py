"""The `semline` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--quantization", default="auto",
                        help="auto (a GGUF keeps its own precision, as `semline serve` without a config), "
                             "none, int8, w8a8 or int4")


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine import AsyncEngine, EngineConfig, SamplingParams
    from engine.llm import apply_chat_template

    engine = AsyncEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                      quantization=args.quantization))
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


# Ray's and Serve's settings for a local `semline serve` (set unless the environment sets them).
# Periodic work slowed: on a 2-core machine an idle server's ~9 processes used 0.145 cores with Ray's
# defaults, 0.095 with these, CPU the model's threads get back. Each only delays bookkeeping
# nobody waits on in a one-node cluster: Serve's control loop (deployment state, autoscaling
# decisions) 0.1 -> 0.5 s, replicas' metrics export 0.1 -> 1 s, the raylet's resource reports
# 0.1 -> 1 s and the GCS's pull of them 1 -> 2 s, its GC check 0.1 -> 1 s, Ray's metrics
# reported every 5 s.
QUIET_RAY = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_raylet_report_resources_period_milliseconds": "1000",
    "RAY_gcs_pull_resource_loads_period_milliseconds": "2000",
    "RAY_raylet_check_gc_period_milliseconds": "1000",
    "RAY_metrics_report_interval_ms": "5000",
    # Serve's throughput-optimized mode (Ray 2.60): replicas run requests on their own event
    # loop (no hop to a user-code thread), a handle's router runs in the caller's loop,
    # replica-to-replica calls (ingress -> LLM server) go over gRPC by value, request-path logs
    # are buffered, GC is frozen after start. A/B on a 2-core Intel Xeon, default config, a
    # server each way (benchmarks/streaming.py's workload, streamed and not in turns): one
    # stream 105 -> 120 output tok/s streamed, 132 -> 145 not (3 rounds of 6 requests); 16
    # streams 280 -> 304 streamed, 317 -> 328 not (2 rounds of 32). Replicas' logs still
    # reach the console.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_LOG_TO_STDERR": "1",
}


def use_quiet_ray() -> None:
    """QUIET_RAY in this process's environment, where it does not set them already: before
    Ray starts (its processes read them at start and inherit them from here)."""
    for name, value in QUIET_RAY.items():
        os.environ.setdefault(name, value)


def _direct_ingress_environment(port: int) -> dict[str, str]:
    """Ray Serve's direct ingress, set up so that the one ingress replica answers on `port`:
    the port range is that port alone, a port its replica let go is free again at once (a
    replacement replica takes it back), and stopping does not wait out the draining period a
    load balancer in front would need. Read by Serve's processes at import: set before Ray
    starts (the controller and the replicas inherit it from this driver's local cluster)."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def _check_port_free(host: str, port: int) -> None:
    """Refuse to start (SystemExit with the reason) when the HTTP port is taken: Serve would
    otherwise retry its replica or proxy on it without end."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise SystemExit(f"semline serve: cannot listen on {host}:{port}: {exc.strerror}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _cmd_serve(args: argparse.Namespace) -> int:
    from deployments.config import SemlineConfig

    # Without a config: the embedded model, at its GGUF file's own precision (the engine's
    # default quantization "auto", as in the library).
    config = SemlineConfig.from_yaml(args.config) if args.config else SemlineConfig()
    if args.port:
        config.http.port = args.port
    http = config.http
    proxy_port = (http.proxy_port or free_port(http.host)) if http.direct_ingress else http.port
    for port in {http.port, proxy_port}:
        _check_port_free(http.host, port)
    if http.direct_ingress:
        os.environ.update(_direct_ingress_environment(http.port))
    else:  # Serve's throughput-optimized mode (QUIET_RAY) would turn it on
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"
    use_quiet_ray()

    import ray
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from deployments.app import build_app

    ray.init(include_dashboard=False, logging_level=logging.WARNING, _metrics_export_port=config.metrics_export_port,
             num_cpus=args.num_cpus)
    serve.start(http_options={"host": http.host, "port": proxy_port},
                logging_config=LoggingConfig(enable_access_log=False))
    serve.run(build_app(config), name="semline", route_prefix="/")
    url = f"http://{http.host}:{http.port}"
    if http.direct_ingress:
        _wait_for_direct_ingress(url)
    print(f"semline is serving {config.model_name} at {url}  (Ctrl-C to stop)\n"
          f"try:\n  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
          f"    -d '{{\"model\": \"{config.model_name}\", \"messages\": [{{\"role\": \"user\", "
          f"\"content\": \"Hello!\"}}]}}'\n"
          f"Prometheus metrics: http://127.0.0.1:{config.metrics_export_port}/metrics (ray_semline_*)"
          + (f"\nServe's proxy (one hop more): http://{http.host}:{proxy_port}" if http.direct_ingress else ""),
          flush=True)
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


def _wait_for_direct_ingress(url: str, timeout_s: float = 60) -> None:
    """serve.run returns once the replicas run; the ingress replica opens its port a moment
    later. Announce the URL only when it answers."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            httpx.get(url + "/health", timeout=5)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the ingress replica did not open {url} within {timeout_s:.0f} s "
                                   "(http.direct_ingress; is the port taken?)") from None
            time.sleep(0.2)


def _result_paths(source: Path, output: str | None) -> tuple[Path, Path]:
    """Where a batch's results and error records go: --output (default SOURCE.output.jsonl)
    and *.errors.jsonl beside it."""
    results = Path(output) if output else source.with_name(source.stem + ".output.jsonl")
    return results, results.with_name(results.stem + ".errors.jsonl")


def _add_output_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=None, help="results file (default: FILE.output.jsonl; "
                                                       "errors go to *.errors.jsonl beside it)")


def _cmd_batch_submit(args: argparse.Namespace) -> int:
    """Upload a JSONL file, create a batch, follow it with a progress bar, write its results."""
    import json

    from openai import OpenAI
    from tqdm import tqdm

    path = Path(args.file)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    endpoint = args.endpoint
    if endpoint is None:  # the first request line names it
        with path.open() as f:
            first = next((line for line in f if line.strip()), "{}")
        try:
            endpoint = json.loads(first).get("url") or "/v1/chat/completions"
        except (json.JSONDecodeError, AttributeError):
            endpoint = "/v1/chat/completions"
    api_key = args.api_key or os.environ.get("SEMLINE_API_KEY") or "none"
    client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=api_key, max_retries=3)
    upload = client.files.create(file=(path.name, path.read_bytes()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")
    print(f"batch {batch.id}: {batch.request_counts.total} requests to {endpoint}", file=sys.stderr)
    final = ("completed", "failed", "cancelled", "expired")
    try:
        with tqdm(total=batch.request_counts.total, unit="req", file=sys.stderr) as bar:
            while True:
                counts = batch.request_counts
                bar.update(counts.completed + counts.failed - bar.n)
                bar.set_postfix(status=batch.status, failed=counts.failed)
                if batch.status in final:
                    break
                time.sleep(args.poll)
                batch = client.batches.retrieve(batch.id)
    except KeyboardInterrupt:
        print(f"\nstopped following; batch {batch.id} keeps running on the server", file=sys.stderr)
        return 130
    output, errors = _result_paths(path, args.output)
    written = []
    for file_id, target in ((batch.output_file_id, output), (batch.error_file_id, errors)):
        if file_id:
            target.write_bytes(client.files.content(file_id).content)
            written.append(str(target))
    counts = batch.request_counts
    print(f"batch {batch.id} {batch.status}: {counts.completed} completed, {counts.failed} failed"
          + (f"; wrote {', '.join(written)}" if written else ""), file=sys.stderr)
    return 0 if batch.status == "completed" else 1


def _cmd_job_submit(args: argparse.Namespace) -> int:
    """Submit an offline batch job (deployments.batch.job) through Ray's Jobs API, follow its log,
    and write its output and error files locally."""
    import json
    import shlex
    import shutil
    import tempfile

    from ray.job_submission import JobStatus, JobSubmissionClient

    from deployments.batch.job import ECHO_PREFIX, tenant_share
    from deployments.config import SemlineConfig

    path = Path(args.file)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if args.tenant is not None:  # refused here, before a job is submitted
        tenant_share(SemlineConfig.from_yaml(args.config) if args.config else SemlineConfig(), args.tenant, 1)
    client = JobSubmissionClient(args.address)
    with tempfile.TemporaryDirectory(prefix="semline-job-") as workdir:
        # The job's working directory travels with it: the input (and config) need no shared storage.
        shutil.copy(path, Path(workdir) / "input.jsonl")
        command = ["python", "-m", "deployments.batch.job", "--input", "input.jsonl", "--output", "output.jsonl",
                   "--num-replicas", str(args.num_replicas), "--batch-size", str(args.batch_size), "--echo-results"]
        if args.config:
            shutil.copy(args.config, Path(workdir) / "semline.yaml")
            command += ["--config", "semline.yaml"]
        for flag, value in (("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus), ("--tenant", args.tenant)):
            if value is not None:
                command += [flag, str(value)]
        job_id = client.submit_job(entrypoint=shlex.join(command), runtime_env={"working_dir": workdir},
                                   metadata={"semline": "batch", "input": path.name})
    print(f"job {job_id} submitted to {args.address}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return 0

    async def follow() -> None:  # the job's log, less the result lines, as it comes
        pending = ""
        async for chunk in client.tail_job_logs(job_id):
            pending += chunk
            *complete, pending = pending.split("\n")
            for line in complete:
                if not line.startswith(ECHO_PREFIX):
                    print(line, file=sys.stderr)

    try:
        asyncio.run(follow())
        while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED}:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (ray job stop {job_id} ends it)", file=sys.stderr)
        return 130
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        print(f"job {job_id} {status.value}: {info.message or ''}", file=sys.stderr)
        return 1
    files: dict[str, list[str]] = {"output": [], "errors": []}
    for line in client.get_job_logs(job_id).splitlines():
        if line.startswith(ECHO_PREFIX):
            item = json.loads(line[len(ECHO_PREFIX):])
            files[item["file"]].append(json.dumps(item["record"], ensure_ascii=False) + "\n")
    output, errors = _result_paths(path, args.output)
    output.write_text("".join(files["output"]))
    errors.write_text("".join(files["errors"]))
    print(f"job {job_id} succeeded: {len(files['output'])} completed, {len(files['errors'])} failed; "
          f"wrote {output}, {errors}", file=sys.stderr)
    return 0


def _cmd_k8s_render(args: argparse.Namespace) -> int:
    from deployments.ops.k8s import DEFAULT_CONFIG, K8S_DIR, NoKeysError, render

    try:
        written = render(Path(args.config) if args.config else DEFAULT_CONFIG,
                         Path(args.output_dir) if args.output_dir else K8S_DIR)
    except NoKeysError as exc:
        print(f"semline k8s render: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def _cmd_dashboard_render(args: argparse.Namespace) -> int:
    from deployments.ops.dashboard import DASHBOARD_FILE, render

    print(render(Path(args.output) if args.output else DASHBOARD_FILE))
    return 0


def _cmd_dashboard_provision(args: argparse.Namespace) -> int:
    from deployments.ops.dashboard import provision

    token = args.token or os.environ.get("GRAFANA_TOKEN")
    for what, action in provision(args.grafana_url, args.prometheus_url, token).items():
        print(f"{what}: {action}")
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
    srv.add_argument("--num-cpus", type=float, default=None,
                     help="CPUs Ray may schedule on this node (default: its cores); more than the cores lets "
                          "a split model's workers (one CPU bundle each) share a small machine")
    srv.set_defaults(func=_cmd_serve)
    batch = sub.add_parser("batch", help="OpenAI-compatible batch jobs on a running server")
    batch_sub = batch.add_subparsers(dest="batch_command", required=True)
    submit = batch_sub.add_parser("submit", help="submit a JSONL batch, follow it, download the results")
    submit.add_argument("file", help="JSONL: one {custom_id, method, url, body} per line")
    submit.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    submit.add_argument("--api-key", default=None, help="API key (default: $SEMLINE_API_KEY)")
    submit.add_argument("--endpoint", default=None, help="default: the url of the file's first line")
    _add_output_argument(submit)
    submit.add_argument("--poll", type=float, default=1.0, help="seconds between status checks")
    submit.set_defaults(func=_cmd_batch_submit)
    job = sub.add_parser("job", help="offline batch jobs on a Ray cluster (Ray Jobs API)")
    job_sub = job.add_subparsers(dest="job_command", required=True)
    jsub = job_sub.add_parser("submit", help="run a JSONL batch as a Ray job, follow it, download the results")
    jsub.add_argument("file", help="OpenAI batch input JSONL")
    jsub.add_argument("--address", default="http://127.0.0.1:8265", help="the Ray dashboard (Jobs API) URL")
    jsub.add_argument("--config", default=None, help="semline config YAML (model and engine settings)")
    _add_output_argument(jsub)
    jsub.add_argument("--num-replicas", type=int, default=1, help="engine actors")
    jsub.add_argument("--batch-size", type=int, default=64, help="lines per engine call")
    jsub.add_argument("--num-cpus", type=float, default=None, help="CPUs per engine actor (default: config)")
    jsub.add_argument("--num-gpus", type=float, default=None, help="GPUs per engine actor (default: config)")
    jsub.add_argument("--tenant", default=None, help="the config's tenant the job runs for (its priority range, "
                      "limits and metrics)")
    jsub.add_argument("--no-wait", action="store_true", help="print the job id and return")
    jsub.set_defaults(func=_cmd_job_submit)
    k8s = sub.add_parser("k8s", help="Kubernetes manifests")
    k8s_sub = k8s.add_subparsers(dest="k8s_command", required=True)
    krender = k8s_sub.add_parser("render", help="write rayservice.yaml and rayjob-batch.yaml from a config")
    krender.add_argument("--config", default=None, help="default: k8s/semline.yaml")
    krender.add_argument("--output-dir", default=None, help="default: k8s/")
    krender.set_defaults(func=_cmd_k8s_render)
    dash = sub.add_parser("dashboard", help="the Grafana dashboard")
    dash_sub = dash.add_subparsers(dest="dashboard_command", required=True)
    render = dash_sub.add_parser("render", help="write the dashboard JSON (default: k8s/grafana/semline.json)")
    render.add_argument("--output", default=None)
    render.set_defaults(func=_cmd_dashboard_render)
    prov = dash_sub.add_parser("provision", help="create or update the datasource and dashboard in Grafana")
    prov.add_argument("--grafana-url", required=True)
    prov.add_argument("--prometheus-url", required=True, help="as Grafana's server reaches it")
    prov.add_argument("--token", default=None, help="a Grafana service-account token (default: $GRAFANA_TOKEN)")
    prov.set_defaults(func=_cmd_dashboard_provision)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as exc:
        print(f"semline: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # openai's API and connection errors: one line, not a traceback
        if type(exc).__module__.startswith("openai"):
            print(f"semline: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
