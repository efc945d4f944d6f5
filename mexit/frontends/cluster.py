"""Work across machines on a Ray cluster: the only module of mexit that imports Ray (`pip install "mexit[ray]"`).

A sweep or a data set is spread over workers, one per GPU of the cluster (one per `threads` CPUs where it has none).
A worker is a plain class holding what its tasks share (a loaded model, prompts, a reference); here it becomes a
Ray actor that Ray restarts after a crash, on any node with room, retrying the task it was running.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Iterator

INSTALL_HINT = 'pip install "mexit[ray]" (Ray on every machine of the cluster, with mexit)'


def require_ray():
    """The ray module; ValueError with the install line when it is missing."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def connect(address: str | None = "auto"):
    """Join a Ray cluster: "auto" one already running for this machine (RAY_ADDRESS, `ray start`), else a new one
    on this machine alone; anything else is a cluster address ("ray://host:10001", "host:6379"). A process already
    connected stays on its cluster. Returns the ray module."""
    ray = require_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=None if address in (None, "auto") else address, log_to_driver=False)
        except ConnectionError as err:
            raise ValueError(f"cannot reach the Ray cluster at {address}: {err}") from None
    return ray


def worker_resources(threads: int = 1) -> tuple[int, dict]:
    """(workers, Ray options of each): one GPU per worker where the cluster has GPUs, else `threads` CPUs."""
    ray = require_ray()
    total = ray.cluster_resources()
    if total.get("GPU", 0) >= 1:
        return int(total["GPU"]), {"num_gpus": 1, "num_cpus": 1}
    return max(1, int(total.get("CPU", 1)) // max(threads, 1)), {"num_cpus": max(threads, 1)}


def where() -> str:
    """This worker's machine and device, for the rows it writes."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{socket.gethostname()}{f' gpu {gpus}' if gpus else ''} pid {os.getpid()}"


def unwrap(error: BaseException) -> BaseException:
    """A task's own exception (a ValueError, ...) out of Ray's wrapper, so that callers see one clear error."""
    ray = require_ray()
    while isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    return error


class Workers:
    """`count` Ray actors of `worker_class(*init_args)`, each with `options` (worker_resources), restarted after a
    crash with their running task retried. `call(method, *args)` runs a method on one worker; `map(method, items)`
    runs `method(item)` for every item across the workers and yields the results as they finish."""

    def __init__(self, worker_class, init_args: tuple, count: int, options: dict):
        ray = require_ray()
        remote = ray.remote(worker_class).options(max_restarts=-1, max_task_retries=-1, **options)
        self.ray, self.actors = ray, [remote.remote(*init_args) for _ in range(count)]

    def get(self, refs):
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as err:
            raise unwrap(err) from None

    def call_all(self, method: str, *args) -> list:
        """`method(*args)` on every worker; their results in worker order."""
        return self.get([getattr(actor, method).remote(*args) for actor in self.actors])

    def map(self, method: str, items: Iterable) -> Iterator:
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        results = pool.map_unordered(lambda actor, item: getattr(actor, method).remote(item), list(items))
        while True:
            try:
                yield next(results)
            except StopIteration:
                return
            except self.ray.exceptions.RayTaskError as err:
                raise unwrap(err) from None

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def generate_file_on_ray(load, load_kw: dict, prompts_file, out, batch: int = 8, seed: int | None = None,
                         progress: bool = True, address: str = "auto", threads: int = 1, **generate_kw) -> dict:
    """`datasets.generate_file` through Ray Data: the prompts not yet in `out` become a data set mapped in batches
    by one GenerateWorker (a model loaded by `load(**load_kw)`, e.g. MultiExitLM.from_pretrained) per GPU of the
    cluster (per `threads` CPUs without GPUs). Rows come back and are written in input order; row i samples with
    seed + i, so the file equals a single-machine run's. Returns {"prompts", "skipped", "written", "seed"}."""
    from pathlib import Path

    from .datasets import GenerateWorker, finished_indices, new_seed, read_prompt_file, write_rows

    records = read_prompt_file(prompts_file)
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    out = Path(out)
    done = finished_indices(out, records)
    todo = [r for r in records if r["index"] not in done]
    seed = new_seed(records) if seed is None else seed  # used by the workers only where the run samples
    ray = connect(address)
    count, options = worker_resources(threads)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    written = []

    def rows_in_order():
        dataset = ray.data.from_items([{"record": json.dumps(r)} for r in todo]).map_batches(
            GenerateWorker, fn_constructor_args=(load, load_kw, seed, generate_kw), batch_size=batch, concurrency=count,
            batch_format="numpy", **options)
        try:
            for item in dataset.iter_rows():
                written.append(json.loads(item["row"]))
                yield written[-1:]
        except ray.exceptions.RayTaskError as err:
            raise unwrap(err) from None

    if todo:
        write_rows(rows_in_order(), out, len(records), len(done), progress)
    sampled = any("seed" in row for row in written)
    return {"prompts": len(records), "skipped": len(done), "written": len(written), "seed": seed if sampled else None}
