"""Work across machines on a Ray cluster: the only module of mexit that imports Ray (`pip install "mexit[ray]"`).

A sweep or a data set is spread over workers, one per GPU of the cluster (one per `threads` CPUs where it has none or
the run asks for the CPU). A worker is a plain class built once per worker from the run's arguments (a loaded model,
prompts, a reference), with methods that each do one task. Files (the checkpoint, prompts) are read by the workers:
on a cluster of several machines they must exist at the same absolute path on each (a shared filesystem).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

INSTALL_HINT = 'pip install "mexit[ray]" (Ray on every machine of the cluster, with mexit)'
ATTEMPTS = 3  # a task whose worker dies this often (a setting that crashes its process) stops the run
USER_ERRORS = (ValueError, OSError, NotImplementedError, RuntimeError)


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
    connected stays on its cluster (and says so if another address was asked for). Returns the ray module."""
    ray = require_ray()
    if ray.is_initialized():
        if address not in (None, "auto"):
            raise ValueError(f"this process is already connected to a Ray cluster; --ray {address} cannot join another")
        return ray
    reachable(address)
    try:
        ray.init(address=None if address in (None, "auto") else address, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise ValueError(f"cannot start or reach the Ray cluster {address!r}: {str(err).splitlines()[0]}") from None
    return ray


def reachable(address: str | None, timeout: float = 5.0) -> None:
    """ValueError at once when a cluster address names a host and port where nothing answers (Ray itself would
    retry for minutes, warning every few seconds)."""
    import socket
    from urllib.parse import urlparse

    if address in (None, "auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if parsed.hostname is None or parsed.port is None:
        return
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout).close()
    except OSError as err:
        raise ValueError(f"no Ray cluster answers at {address} ({type(err).__name__}: {err}): start one there "
                         "(`ray start --head`) or pass --ray without an address for a cluster on this machine"
                         ) from None


def worker_resources(device: str | None, threads: int = 1, tasks: int | None = None) -> tuple[int, dict]:
    """(workers, Ray options of each) for a run on `device` (None: cuda where the cluster has GPUs): one GPU per
    worker, else `threads` CPUs per worker; never more workers than `tasks`."""
    ray = require_ray()
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    wants_cuda = device is not None and str(device).startswith("cuda")
    if wants_cuda and gpus == 0:
        raise ValueError(f"--device {device} was asked for, but the Ray cluster has no GPU")
    if gpus and (device is None or wants_cuda):
        count, options = gpus, {"num_gpus": 1, "num_cpus": 1}
    else:
        count, options = max(1, int(total.get("CPU", 1)) // max(threads, 1)), {"num_cpus": max(threads, 1)}
    return max(1, min(count, tasks if tasks is not None else count)), options


def absolute(path: str | os.PathLike | None) -> str | None:
    """A local path made absolute (workers start in other folders); a hub id or None as is."""
    return str(Path(path).resolve()) if path is not None and Path(path).exists() else path


def where() -> str:
    """The process this runs in: its machine, GPU and pid, for the rows it writes."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{socket.gethostname()}{f' gpu {gpus}' if gpus else ''} pid {os.getpid()}"


class Guarded:
    """`build(*args)` on a worker. A failure to build (a missing file, a bad setting, no GPU) is raised again by
    every call, so that the driver gets it as a plain error instead of a dead worker."""

    def __init__(self, build, *args):
        try:
            self.target, self.error = build(*args), None
        except USER_ERRORS as err:
            self.target, self.error = None, err

    def call(self, method: str, *args):
        if self.error is not None:
            raise self.error
        return getattr(self.target, method)(*args)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class Workers:
    """`count` Ray actors, each a `Guarded(build, *args)` with `options` (worker_resources). A worker that dies is
    restarted by Ray (up to ATTEMPTS times); the task it was running goes to the next free worker, and a task that
    killed ATTEMPTS workers stops the run with an error naming it."""

    def __init__(self, build, args: tuple, count: int, options: dict):
        ray = require_ray()
        remote = ray.remote(Guarded).options(max_restarts=ATTEMPTS, max_task_retries=0, **options)
        self.ray, self.actors = ray, [remote.remote(build, *args) for _ in range(count)]

    def error(self, err: BaseException) -> BaseException:
        """A task's own exception out of Ray's wrapper, or a worker's death as one ValueError."""
        while isinstance(err, self.ray.exceptions.RayTaskError) and err.cause is not None:
            err = err.cause
        if isinstance(err, USER_ERRORS):
            return err
        return ValueError(f"a Ray worker failed: {first_line(err)}")

    def get(self, submit):
        """ray.get of what `submit()` returns, submitted again while the workers die and restart."""
        for attempt in range(ATTEMPTS + 1):
            try:
                return self.ray.get(submit())
            except self.ray.exceptions.RayActorError as err:
                if attempt == ATTEMPTS:
                    raise ValueError(f"a Ray worker died {ATTEMPTS + 1} times: {first_line(err)}") from None
                time.sleep(0.5 * (attempt + 1))  # a restart takes a moment
            except self.ray.exceptions.RayError as err:
                raise self.error(err) from None

    def call_one(self, method: str, *args):
        """`method(*args)` on the first worker."""
        return self.get(lambda: self.actors[0].call.remote(method, *args))

    def call_all(self, method: str, *args) -> list:
        """`method(*args)` on every worker; their results in worker order."""
        return self.get(lambda: [actor.call.remote(method, *args) for actor in self.actors])

    def map(self, method: str, items: Iterable) -> Iterator:
        """`method(item)` for every item, each on a free worker; results as they finish."""
        queue, idle, running = deque(items), list(range(len(self.actors))), {}
        attempts, deaths = {}, [0] * len(self.actors)
        while queue or running:
            if not running and not idle:
                raise ValueError(f"every Ray worker died {ATTEMPTS + 1} times; {len(queue)} task(s) not done")
            while queue and idle:
                worker, item = idle.pop(), queue.popleft()
                running[self.actors[worker].call.remote(method, item)] = (worker, item)
            ready, _ = self.ray.wait(list(running), num_returns=1)
            worker, item = running.pop(ready[0])
            try:
                result = self.ray.get(ready[0])
            except self.ray.exceptions.ActorUnavailableError:  # restarting: the task waits for a free worker
                queue.appendleft(item)
                idle.insert(0, worker)  # asked again last
                time.sleep(0.1)
                continue
            except self.ray.exceptions.RayActorError as err:  # the worker died: Ray restarts it; the task goes on
                attempts[item], deaths[worker] = attempts.get(item, 0) + 1, deaths[worker] + 1
                if attempts[item] >= ATTEMPTS:
                    raise ValueError(f"task {item!r} ended its Ray worker {attempts[item]} times (last: "
                                     f"{first_line(err)}); stopping") from None
                if deaths[worker] <= ATTEMPTS:  # restarts left: its next task waits for the restart
                    idle.append(worker)
                queue.appendleft(item)
                continue
            except self.ray.exceptions.RayError as err:
                raise self.error(err) from None
            idle.append(worker)
            yield result

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def generate_file_on_ray(load, load_kw: dict, prompts_file, out, batch: int = 8, seed: int | None = None,
                         progress: bool = True, address: str = "auto", threads: int = 1, skip_bad: bool = False,
                         **generate_kw) -> dict:
    """`datasets.generate_file` through Ray Data: the prompts not yet in `out` become a data set mapped in batches
    by one GenerateWorker (a model loaded by `load(**load_kw)`, e.g. MultiExitLM.from_pretrained, with `threads`
    CPU threads) per GPU of the cluster (per `threads` CPUs without GPUs). Rows come back and are written in input
    order; row i samples with seed + i, so the file equals a single-machine run's. A worker's error (a missing
    checkpoint, a bad setting) is raised here as a ValueError. The prompts are checked and the settings recorded
    and compared here first, as `datasets.generate_file` does (with the checkpoint's tokenizer and config).
    Returns {"prompts", "skipped", "written", "bad", "seed"}."""
    from .datasets import (
        GenerateWorker,
        checked_todo,
        new_seed,
        new_tokens,
        open_output,
        run_settings,
        with_error_rows,
        write_rows,
    )

    records, done, seed = open_output(prompts_file, out, batch, seed)
    folder, config, tokenizer, defaults = checkpoint_facts(load_kw)
    n, max_length = new_tokens(generate_kw, defaults)
    generate_kw = dict(generate_kw, max_new_tokens=n)  # the workers generate what was checked and recorded
    ray = connect(address)
    settings = run_settings(folder, worker_dtype(load_kw, folder), generate_kw, defaults)

    def encode(text):
        if tokenizer is None:
            raise ValueError("text prompt, but the checkpoint has no tokenizer: give input_ids")
        return tokenizer(text, verbose=False)["input_ids"]  # lengths: checked by mexit

    todo, bad = checked_todo(prompts_file, out, records, done, encode, config, settings, skip_bad, max_length)
    good = [r for r in todo if r["index"] not in bad]
    seed = new_seed(records) if seed is None else seed  # used by the workers only where the run samples
    count, options = worker_resources(load_kw.get("device"), threads, len(good))
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")  # Ray Data's notes on its own deprecated settings
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # mexit shows its own, and Ray Data's plans and progress logs are quieted
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("ray.data")]:
        logging.getLogger(name).setLevel(logging.ERROR)
    written = []

    def rows_in_order():
        dataset = ray.data.from_items([{"record": json.dumps(r)} for r in good]).map_batches(
            GenerateWorker, fn_constructor_args=(load, load_kw, seed, generate_kw, threads), batch_size=batch,
            compute=ray.data.ActorPoolStrategy(size=count), batch_format="numpy", **options)
        try:
            for item in dataset.iter_rows():
                row = json.loads(item["row"])
                if "error" in row:
                    raise ValueError(row["error"])
                written.append(row)
                yield [row]
        except ray.exceptions.RayError as err:
            raise ValueError(f"a Ray worker failed: {first_line(err)}") from None

    if todo:
        rows = rows_in_order() if good else iter(())
        write_rows(with_error_rows(rows, todo, bad), Path(out), len(records), len(done), progress)
    sampled = any("seed" in row for row in written)
    return {"prompts": len(records), "skipped": len(done), "written": len(written), "bad": len(bad),
            "seed": seed if sampled else None}


def checkpoint_facts(load_kw: dict):
    """(folder, ModelConfig, tokenizer or None, generation defaults) of the checkpoint `load_kw` names, read on
    the driver without loading weights."""
    from mexit.model.checkpoint import read_config, resolve_folder
    from mexit.model.generation_config import generation_defaults, load_tokenizer, read_generation_config

    folder = resolve_folder(load_kw["path_or_id"])
    return (folder, read_config(folder), load_tokenizer(folder),
            generation_defaults(read_generation_config(folder), warn=False))


def worker_dtype(load_kw: dict, folder) -> str:
    """The dtype the workers load with, as a one-machine run records it: "auto" the checkpoint's stored dtype;
    None fp16 where the workers run on GPUs (an explicit cuda device, or none given on a cluster with GPUs),
    fp32 elsewhere. Call once connected (the cluster's resources decide the device)."""
    import torch

    from mexit.model.checkpoint import canonical, read_config
    from mexit.model.files import open_tensors
    from mexit.model.placement import resolve_dtype

    dtype, device = load_kw.get("dtype"), load_kw.get("device")
    if isinstance(dtype, str) and dtype.lower() == "auto":  # what `checkpoint.load` computes in
        stored, _ = canonical(open_tensors(folder), read_config(folder))
        return str(stored["transformer.wte.weight"].dtype).removeprefix("torch.")
    if device in (None, "auto"):
        cuda = int(require_ray().cluster_resources().get("GPU", 0)) > 0
    else:
        cuda = isinstance(device, int) or str(device).startswith("cuda")
    return str(resolve_dtype(dtype, torch.device("cuda" if cuda else "cpu"))).removeprefix("torch.")
