"""Model parallelism on Ray workers: the layers split into pipeline stages, each stage's
layers split over a tensor-parallel group of workers.

`tensor_parallel_size` T and `pipeline_parallel_size` P make T x P `ModelWorker` actors,
one per GPU (or CPU share). Stage s holds a contiguous range of decoder layers (the first
also the embedding, the last also the final norm and the output head); within a stage,
rank r of T holds its share of each of those layers' heads, MLP columns and vocabulary
rows (engine/parallel.py), reads only those slices of the checkpoint, and keeps the KV
cache of its own KV heads. A stage's T workers form one torch.distributed process group
(gloo on CPUs, NCCL on GPUs) that its all-reduces run over; CPU ranks on one host
all-reduce through shared memory instead (engine/parallel.py: ~30x less time than gloo's
loopback TCP for a decode batch's hidden states).

The engine's scheduler and block manager stay in the driver (the replica): every step,
the `ParallelRunner` puts the step's plan (token ids, positions, slot mapping, block
tables: plain lists) once and hands it to every worker, so all caches use the same block
ids. A stage's hidden states (replicated over its ranks after the last all-reduce) go
from its rank 0 to every rank of the next stage as numpy arrays; the last stage's rank 0
returns the logits of the rows that sample (or need penalties or logprobs) and only the
argmax token id of each greedy row (4 bytes instead of a vocabulary of floats;
LogitsAssembler turns them back into rows the sampler reads). Other ranks return None.

The chain runs as a Ray Compiled Graph (channels set up once; `transport:
compiled_graph`, the default on GPUs) or as plain actor calls chained by object refs
(`actor_calls`, the default on CPUs: a compiled graph's channel readers poll, which
costs more compute than it saves in transport where workers share cores;
benchmarks/pipeline.py).

Placement: one placement group, one bundle per worker (stage after stage, rank after
rank), `PACK` by default. Inside a Serve replica that reserved them
(`placement_group_bundles`: bundle 0 for the replica), the workers use bundles 1..T*P of
the replica's group.

Faults: a worker that dies, fails or does not answer within `step_timeout_s` fails the
step with `ExecutorError`; the engine then re-queues every running request for
recomputation and calls `rebuild()`, which replaces every stage with a dead, failed or
unresponsive worker (all T ranks of it: a process group cannot take a new member; the
other stages keep their weights; every KV cache is treated as empty). The replica
reports itself unhealthy meanwhile.

Micro-batches: the engine keeps up to `max_inflight` batches in flight at once (one per
stage by default), each from requests not in another batch in flight, so every stage
has work while the driver samples.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.executors import ParallelConfig, worker_bundle
from engine.config import ConfigError, EngineConfig
from engine.executor import ExecutorError
from engine.loader import load_hf_config
from engine.model_runner import ModelRunner, StepPlan, plan_step
from engine.models import build_model, model_args
from engine.quantization import layer_kinds
from engine.parallel import SharedMemoryAllReduce, TensorParallel

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120
# What a dead, stuck or failed worker looks like to the driver (a compiled graph reports a
# dead actor as a closed channel; a rank whose peer died fails its collective: a task error).
WORKER_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ObjectLostError,
                 ray.exceptions.RayChannelError, ray.exceptions.RayTaskError)


def split_layers(num_layers: int, num_stages: int, counts: list[int] | None = None) -> list[tuple[int, int]]:
    """[first, last) layer ranges, one per stage: `counts` when given, else as even as possible
    (earlier stages take the remainder)."""
    if counts is None:
        counts = [num_layers // num_stages + (i < num_layers % num_stages) for i in range(num_stages)]
    if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
        raise ConfigError(f"pipeline_layers {counts} must be {num_stages} counts >= 1 summing to {num_layers}")
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


@ray.remote
class ModelWorker:
    """Tensor-parallel rank `tp_rank` of layers [first, last) of the model and its KV cache, in
    its own process. Built empty; `load` joins the rank's process group and loads its share."""

    def __init__(self, config: dict, model_dir: str, dtype: str, max_model_len: int, first: int, last: int,
                 tp_rank: int, tp_size: int, num_threads: int, device_share: float) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.config = EngineConfig.from_dict(config)
        self.model_dir, self.dtype, self.max_model_len = Path(model_dir), getattr(torch, dtype), max_model_len
        self.first, self.last, self.tp_rank, self.tp_size = first, last, tp_rank, tp_size
        self.device_share = device_share
        self.device = torch.device("cuda") if torch.cuda.is_available() and self.config.device != "cpu" else \
            torch.device("cpu")
        self.runner: ModelRunner | None = None
        self.busy_seconds, self.num_runs = 0.0, 0
        self.collective_seconds, self.collective_bytes, self.num_collectives = 0.0, 0, 0

    def address(self) -> str:
        """host:port where this rank (0) of a new process group listens."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def load(self, master: str | None, backend: str, timeout_s: float, group_name: str) -> int:
        """Join the stage's process group (all its ranks call this at once), then load this
        rank's share of the weights; returns the KV blocks it can hold."""
        hf_config = load_hf_config(self.model_dir)
        tp = TensorParallel()
        if self.tp_size > 1:
            use_shm = backend == "auto" and self.device.type == "cpu"
            backend = backend if backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
            _join_group(backend, master, self.tp_rank, self.tp_size, timeout_s)
            # The largest all-reduce of a step: every token's hidden state.
            step_bytes = self.config.max_num_batched_tokens * model_args(hf_config).hidden_size * self.dtype.itemsize
            shm = _shared_memory(group_name, self.tp_rank, self.tp_size, step_bytes, timeout_s) if use_shm else None
            tp = _TimedTensorParallel(self.tp_rank, self.tp_size, shm=shm, worker=self)
        self.runner = ModelRunner(self.config, hf_config, self.model_dir, self.device, self.dtype,
                                  self.max_model_len, self.first, self.last, tp, self.device_share)
        return self.runner.num_blocks

    def ping(self) -> int:
        return os.getpid()

    def resize_cache(self, num_blocks: int) -> None:
        """Every worker must hold the same block ids: the smallest affordable count wins."""
        self.runner.resize_kv_cache(num_blocks)

    def info(self) -> dict:
        tp = self.runner.tp
        transport = "none" if not tp.enabled else "shared_memory" if tp.shm is not None else dist.get_backend()
        return {"layers": [self.first, self.last], "rank": self.tp_rank, "all_reduce": transport,
                "node": ray.get_runtime_context().get_node_id(),
                "num_parameters": self.runner.num_parameters, "num_kv_heads": self.runner.model.num_kv_heads,
                "num_blocks": self.runner.num_blocks, "pid": os.getpid(), "device": str(self.runner.device),
                "busy_seconds": self.busy_seconds, "num_runs": self.num_runs,
                "collective_seconds": self.collective_seconds, "collective_bytes": self.collective_bytes,
                "num_collectives": self.num_collectives, "layer_kinds": layer_kinds(self.runner.model)}

    def run(self, plan: StepPlan, hidden: np.ndarray | None):
        """Hidden states in, hidden states out, as numpy arrays: Ray stores those without
        pickling and the next process maps them without a copy. The last stage's rank 0
        returns (logits of the rows that need them, argmax token ids of plan.argmax_rows);
        other ranks return None."""
        start = time.perf_counter()
        if hidden is not None:
            hidden = _tensor(hidden)
            if hidden.dtype == torch.int16:
                hidden = hidden.view(torch.bfloat16)
        out = self.runner.execute_split(self.runner.build(plan), hidden, plan.argmax_rows)
        if isinstance(out, tuple):  # the last stage's rank 0: fp32 logits and token ids
            result = out[0].cpu().numpy(), out[1].cpu().numpy()
        else:
            result = None if out is None else _to_numpy(out)
        self.busy_seconds += time.perf_counter() - start
        self.num_runs += 1
        return result

    def shutdown(self) -> None:
        if self.runner is not None and self.runner.tp.shm is not None:
            self.runner.tp.shm.close()
        if self.tp_size > 1:
            _leave_group()


# Module functions, not ModelWorker methods: Ray pickles the actor class by value, and
# cloudpickle then drags torch.distributed.config (unpicklable) along with any method that
# names both `dist` and an attribute called `config`.
def _join_group(backend: str, master: str, rank: int, size: int, timeout_s: float) -> None:
    dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _shared_memory(group_name: str, rank: int, size: int, max_bytes: int,
                   timeout_s: float) -> SharedMemoryAllReduce | None:
    """All-reduces through shared memory when every rank of the (just formed) process group
    is on this host, as all ranks decide together from their node ids; else None (gloo)."""
    nodes = [None] * size
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if len(set(nodes)) > 1 or not SharedMemoryAllReduce.supported():
        return None
    path = f"/dev/shm/semline-{group_name}"
    shm = SharedMemoryAllReduce(path, rank, size, max_bytes, create=True, timeout_s=timeout_s) if rank == 0 else None
    dist.barrier()  # the file exists
    if rank:
        shm = SharedMemoryAllReduce(path, rank, size, max_bytes, create=False, timeout_s=timeout_s)
    dist.barrier()  # every rank has it mapped: nothing is left to leak if one dies
    if rank == 0:
        os.unlink(path)
    return shm


@dataclass(frozen=True)
class _TimedTensorParallel(TensorParallel):
    """A rank that counts its all-reduces' time and bytes (ModelWorker.info, the benchmark)."""

    worker: object = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        super().all_reduce(x)
        worker = self.worker
        worker.collective_seconds += time.perf_counter() - start
        worker.collective_bytes += x.numel() * x.element_size()
        worker.num_collectives += 1
        return x


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw 16-bit words
        tensor = tensor.view(torch.int16)
    return tensor.cpu().numpy()


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over an array Ray mapped read-only from its object store (no copy; nothing
    downstream writes to it in place)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
        return torch.from_numpy(array)


class LogitsAssembler:
    """The driver's [rows, vocab] logits from the last stage's (full rows, argmax ids of
    argmax_rows): a row sent as its argmax becomes -inf everywhere but 0 at that token, which
    every greedy reader (the sampler's argmax, greedy verification) reads as the same token.
    An all-greedy step (the common decode step) reuses one buffer instead of filling a new
    tensor: only the entries the previous step set to 0 go back to -inf, so a result is
    valid until the next call."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._buffer = torch.empty(0, vocab_size)
        self._hot = (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))

    def __call__(self, full: torch.Tensor, token_ids: torch.Tensor, argmax_rows: list[int],
                 num_rows: int) -> torch.Tensor:
        if not argmax_rows:
            return full
        rows = torch.tensor(argmax_rows)
        if full.shape[0] == 0:
            if self._buffer.shape[0] < num_rows:
                self._buffer = torch.full((num_rows, self.vocab_size), float("-inf"))
            else:
                self._buffer[self._hot] = float("-inf")
            logits = self._buffer[:num_rows]
            self._hot = (rows, token_ids)
        else:
            logits = torch.full((num_rows, self.vocab_size), float("-inf"))
            others = torch.ones(num_rows, dtype=torch.bool)
            others[rows] = False
            logits[others] = full
        logits[rows, token_ids] = 0.0
        return logits


@dataclass
class _Step:
    """A submitted step: the refs of every worker's result (the last stage's rank 0 first)."""

    refs: list
    workers: list  # (stage, rank) of each ref
    start: float
    plan: StepPlan


class ParallelRunner:
    """Stands in for the engine's ModelRunner when tensor_parallel_size or
    pipeline_parallel_size is above 1."""

    def __init__(self, config: EngineConfig, parallel: ParallelConfig, hf_config, model_dir: Path,
                 device: torch.device, dtype: torch.dtype, max_model_len: int) -> None:
        if not ray.is_initialized():
            ray.init(logging_level=logging.WARNING)
        self.config, self.parallel = config, parallel
        self.args = model_args(hf_config)
        self.block_size = config.block_size
        self.device = torch.device("cpu")  # logits come back to the driver's memory
        self.decode_kernel = None
        self.num_stages, self.tp_size = config.pipeline_parallel_size, config.tensor_parallel_size
        # Batches the engine keeps in flight (one per stage by default).
        self.max_inflight = parallel.inflight_batches or self.num_stages
        self.ranges = split_layers(self.args.num_layers, self.num_stages, config.pipeline_layers)
        self._check_divisible(hf_config)
        self.threads = config.num_threads or 1
        on_gpu = device.type == "cuda"
        self.bundle = worker_bundle(on_gpu, self.threads, parallel.gpus_per_worker)
        size = self.num_stages * self.tp_size
        self._own_group = None
        group, self.first_bundle = get_current_placement_group(), 1
        if group is None or len(group.bundle_specs) < size + 1:  # not inside a replica that reserved them
            group = self._own_group = placement_group([self.bundle] * size, strategy=parallel.placement_strategy)
            self.first_bundle = 0
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        self.group = group
        self._worker_args = (
            dataclasses.asdict(dataclasses.replace(config, tensor_parallel_size=1, pipeline_parallel_size=1,
                                                   pipeline_layers=None)),
            str(model_dir), str(dtype).removeprefix("torch."), max_model_len)
        self.stages: list[list] = [[] for _ in range(self.num_stages)]
        self._start_stages(list(range(self.num_stages)))
        transport = parallel.transport
        self.transport = transport if transport != "auto" else ("compiled_graph" if on_gpu else "actor_calls")
        self.dag = None
        self._compile()
        self.wall_seconds, self.num_steps, self.num_rebuilds = 0.0, 0, 0
        self._suspects: set[int] = set()  # stages whose workers failed the last step
        self._assemble = LogitsAssembler(self.args.vocab_size)
        # LoRA slots (engine/lora.py): what each holds, and the changes the next plan carries to
        # every worker (each keeps its layers' and its rank's share).
        self._loras: dict[int, object] = {}
        self._lora_updates: dict[int, object] = {}
        logger.info("%d stage(s) (layers %s) of %d tensor-parallel worker(s), %d KV blocks",
                    self.num_stages, self.ranges, self.tp_size, self.num_blocks)

    def _check_divisible(self, hf_config) -> None:
        """Refuse a tensor_parallel_size the model cannot split, before any worker starts: each
        rank's share is built on the meta device (no memory), by the very code the workers run."""
        try:
            with torch.device("meta"):
                for rank in range(self.tp_size):
                    build_model(hf_config, tp=TensorParallel(rank, self.tp_size))
        except ValueError as exc:
            raise ConfigError(f"tensor_parallel_size {self.tp_size}: {exc}") from exc

    # --- workers ---------------------------------------------------------------

    def _start_stages(self, indices: list[int]) -> None:
        """Start (or restart) the workers of these stages, form each stage's process group,
        load their shares, and agree on one KV block count."""
        timeout = self.parallel.step_timeout_s
        for index in indices:
            first, last = self.ranges[index]
            self.stages[index] = [
                ModelWorker.options(
                    num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.group, placement_group_bundle_index=self.first_bundle + index * self.tp_size + rank),
                ).remote(*self._worker_args, first, last, rank, self.tp_size, self.threads,
                         self.parallel.gpus_per_worker)
                for rank in range(self.tp_size)]
        loads = []
        for index in indices:
            workers = self.stages[index]
            master = ray.get(workers[0].address.remote(), timeout=PLACEMENT_TIMEOUT_S) if self.tp_size > 1 else None
            group_name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
            loads += [w.load.remote(master, self.parallel.tp_backend, timeout, group_name) for w in workers]
        blocks = ray.get(loads)
        if len(indices) == self.num_stages:
            self.num_blocks = min(blocks)
        ray.get([w.resize_cache.remote(self.num_blocks) for i in indices for w in self.stages[i]],
                timeout=PLACEMENT_TIMEOUT_S)

    @property
    def workers(self) -> list:
        return [w for stage in self.stages for w in stage]

    def _compile(self) -> None:
        """The chain as a Ray Compiled Graph: the plan goes to every worker, each stage's
        rank-0 output to every rank of the next, over channels set up once
        (benchmarks/pipeline_transport.py: ~4x less transport time per step than actor
        calls on this machine). The other ranks' outputs (None) end the graph too."""
        if self.transport != "compiled_graph":
            return
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as plan:
            hidden, others = None, []
            for stage in self.stages:
                outputs = [worker.run.bind(plan, hidden) for worker in stage]
                hidden = outputs[0]
                others += outputs[1:]
            dag = MultiOutputNode([hidden, *others]) if others else hidden
        self.dag = dag.experimental_compile(_max_inflight_executions=self.max_inflight)

    def _teardown(self) -> None:
        if self.dag is not None:
            try:
                self.dag.teardown()
            except Exception as exc:  # noqa: BLE001 - a broken graph is being replaced anyway
                logger.warning("compiled graph teardown: %r", exc)
            self.dag = None

    def rebuild(self) -> list[int]:
        """Replace every stage with a worker that is dead, does not answer, or failed the last
        step (all its ranks); returns their indices. The caller must treat every KV cache as
        empty (the survivors' caches are not cleared, but no request may rely on them)."""
        self._teardown()
        broken = set(self._suspects)  # their survivors may be stuck waiting for a dead peer: no ping
        pings = {w.ping.remote(): i for i, stage in enumerate(self.stages) if i not in broken for w in stage}
        ready, unanswered = ray.wait(list(pings), num_returns=len(pings), timeout=self.parallel.step_timeout_s) \
            if pings else ([], [])
        broken.update(pings[ref] for ref in unanswered)
        for ref in ready:
            try:
                ray.get(ref)
            except WORKER_ERRORS:
                broken.add(pings[ref])
        dead = sorted(broken)
        for index in dead:
            for worker in self.stages[index]:
                ray.kill(worker, no_restart=True)
        deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
        while True:
            if self._own_group is not None:  # Ray re-places a group whose node died
                ray.get(self.group.ready(), timeout=PLACEMENT_TIMEOUT_S)
            try:
                if dead:
                    self._start_stages(dead)
                break
            except WORKER_ERRORS as exc:
                # A new worker went to a node that is dying but not yet known dead (its bundle
                # not yet re-placed): wait for Ray to notice, then place the stage again.
                for index in dead:
                    for worker in self.stages[index]:
                        ray.kill(worker, no_restart=True)
                if time.monotonic() > deadline:
                    raise
                logger.warning("replacement workers died while loading (%s); placing them again", exc)
                time.sleep(2.0)
        self._suspects = set()
        self._compile()
        self._lora_updates = dict(self._loras)  # new workers start with empty slots
        self.num_rebuilds += 1
        logger.warning("workers rebuilt: replaced stage(s) %s", dead)
        return dead

    # --- steps -----------------------------------------------------------------

    def set_lora(self, slot: int, adapter) -> None:
        if adapter is None:
            self._loras.pop(slot, None)
        else:
            self._loras[slot] = adapter
        self._lora_updates[slot] = adapter

    def prepare(self, chunks) -> StepPlan:
        plan = plan_step(chunks, self.block_size)
        plan.lora_updates, self._lora_updates = self._lora_updates, {}
        row = 0
        for chunk in chunks:  # logits rows in chunk order, as plan_step lays them out
            rows = range(row, row + chunk.num_logits)
            if chunk.samples_token and not chunk.all_logits and chunk.request.sampling_params.reads_only_argmax:
                plan.argmax_rows += rows
            row = rows.stop
        return plan

    def submit(self, plan: StepPlan) -> _Step:
        """Start the plan through the workers without waiting: each stage's calls take the
        previous stage's rank-0 result as a ref, which Ray hands from worker to worker. A
        worker runs its calls in order, so batches in flight overlap (stage 1 on batch k+1,
        stage 2 on k) and a freed block's last writes land before any later batch's."""
        start = time.perf_counter()
        try:
            if self.dag is not None:
                return _Step([self.dag.execute(plan)], [], start, plan)
            plan_ref, hidden, refs, workers = ray.put(plan), None, [], []
            for index, stage in enumerate(self.stages):
                outputs = [worker.run.remote(plan_ref, hidden) for worker in stage]
                hidden = outputs[0]
                refs += outputs
                workers += [(index, rank) for rank in range(len(stage))]
            last = len(refs) - self.tp_size  # the last stage's rank 0 first
            return _Step([refs[last]] + refs[:last] + refs[last + 1:],
                         [workers[last]] + workers[:last] + workers[last + 1:], start, plan)
        except WORKER_ERRORS as exc:
            raise ExecutorError(f"a model worker failed: {exc}") from exc

    def result(self, step: _Step) -> torch.Tensor:
        """The logits of a submitted plan. A row the last stage sent as its argmax comes back
        as -inf everywhere but 0 at that token, which every greedy reader (the sampler's
        argmax, greedy verification) reads as the same token. Valid until the next result().
        Every worker's call is awaited, so a rank that fails is noticed at once, not when its
        peers' collective times out."""
        timeout = self.parallel.step_timeout_s
        if self.dag is not None:
            try:
                out = ray.get(step.refs[0], timeout=timeout)
            except WORKER_ERRORS as exc:
                raise ExecutorError(f"a model worker failed: {exc}") from exc
            full, token_ids = out[0] if isinstance(out, list) else out
        else:
            full, token_ids = self._await_all(step, timeout)
        logits = self._assemble(_tensor(full), torch.from_numpy(token_ids).long(), step.plan.argmax_rows,
                                len(step.plan.logits_indices))
        self.wall_seconds += time.perf_counter() - step.start
        self.num_steps += 1
        return logits

    def _await_all(self, step: _Step, timeout: float):
        """The last stage's rank-0 result, once every worker's call of the step has returned."""
        deadline = step.start + timeout
        pending, values = list(step.refs), {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                self._suspect(step, pending)
                raise ExecutorError(f"a model worker did not answer within {timeout} s")
            try:
                values[ready[0]] = ray.get(ready[0])
            except WORKER_ERRORS as exc:
                self._suspect(step, ready)
                raise ExecutorError(f"a model worker failed: {exc}") from exc
        return values[step.refs[0]]

    def _suspect(self, step: _Step, refs: list) -> None:
        """Remember the stages of workers that failed or hung (rebuild replaces them)."""
        self._suspects.update(step.workers[step.refs.index(ref)][0] for ref in refs)

    def execute(self, plan: StepPlan) -> torch.Tensor:
        return self.result(self.submit(plan))

    def worker_info(self) -> list[dict]:
        """Per worker, stage after stage and rank after rank: its layers, rank, parameters,
        KV heads and blocks, process, busy and all-reduce time."""
        return ray.get([w.info.remote() for w in self.workers])

    def stage_info(self) -> list[dict]:
        """Rank 0 of each stage."""
        return ray.get([stage[0].info.remote() for stage in self.stages])

    @property
    def num_parameters(self) -> int:
        return sum(info["num_parameters"] for info in self.worker_info())

    def shutdown(self) -> None:
        """Stop the workers (they close their shared memory and leave their process group
        first) and give back the placement group this runner reserved. Idempotent; a no-op
        once Ray itself is shut down (its workers and groups are gone with it)."""
        workers, self.stages = self.workers, [[] for _ in range(self.num_stages)]
        group, self._own_group = self._own_group, None
        if not ray.is_initialized():
            return
        self._teardown()
        try:
            ray.get([w.shutdown.remote() for w in workers], timeout=5)
        except WORKER_ERRORS + (ray.exceptions.GetTimeoutError,):
            pass
        for worker in workers:
            ray.kill(worker, no_restart=True)
        if group is not None:
            remove_placement_group(group)
