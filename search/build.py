"""Variant database builds spread over Ray workers.

The building process feeds each block the calibration inputs once, accumulating
every unit's statistics (e.g. the Hessian), and sends each unit's
:class:`~evocomp.supernet.database.UnitJob` (its compressor with those statistics)
to a Ray task, which runs :func:`~evocomp.supernet.database.compress_unit`, the
same function an in-process build runs, on as many torch threads as the
executor's workers use. The tensors come back through Ray's object store, in the
jobs' order, and the building process writes each block file atomically as
before, so the files are byte for byte those of an in-process build and an
interrupted build resumes at the first unfinished block. While the workers
compress a block, the building process writes the block before and forwards the
next one (when the next block's inputs go through this block's start variants,
after the workers are done with it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from evocomp.errors import EvocompError
from evocomp.search.executor import RayExecutorParams, forwarded_env, ray_get, start_ray
from evocomp.supernet.database import UnitJob, compress_unit


def _compress(job: UnitJob, threads: int) -> dict[str, torch.Tensor]:
    """One Ray task: ``job``'s tensors, on ``threads`` torch threads (a task may run in
    a worker process that ran others, so it says so each time)."""
    torch.set_num_threads(threads)
    return compress_unit(job)


def _work(job: UnitJob) -> int:
    """A unit's compression work, relatively: rows x columns^2 (SparseGPT's and GPTQ's
    column sweeps; a fair order for the cheaper compressors too)."""
    comp = job.compressor
    return comp.rows * comp.columns**2 * len(job.keys)


class RayCompressUnits:
    """:class:`~evocomp.supernet.database.CompressUnits` on Ray tasks, sized like a
    :class:`~evocomp.search.executor.RayExecutor`'s workers: each task reserves
    ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs and runs
    ``threads_per_worker`` torch threads. With ``address: null`` a local Ray with
    ``num_workers x cpus_per_worker`` CPUs (so at most ``num_workers`` tasks at once)
    is started on the first block to compress, not before (a complete database needs
    none), and stopped by :meth:`close`; a joined cluster runs as many tasks at once
    as its resources allow. A Ray already initialised here is used and left running.

    Use it as a context manager. A task that fails with an
    :class:`~evocomp.errors.EvocompError` re-raises it here; a dead worker raises one.
    """

    ahead = 1
    """A block is compressed while the building process writes the block before and
    accumulates the next block's statistics, so it holds at most two blocks'
    tensors."""

    def __init__(self, params: RayExecutorParams) -> None:
        self.params = params
        self._ray: Any = None
        self._task: Any = None
        self._started = False

    def _connect(self) -> None:
        try:
            import ray
        except ImportError:
            raise EvocompError("executor 'ray' needs Ray: pip install 'evocomp[ray]'") from None
        p = self.params
        self._ray = ray
        self._started = start_ray(
            p.address,
            who="the Ray database build",
            num_cpus=max(1, math.ceil(p.num_workers * p.cpus_per_worker)),
        )
        options: dict[str, Any] = {
            "num_cpus": p.cpus_per_worker,
            "num_gpus": p.gpus_per_worker,
            "max_retries": 0,  # a failed compression fails the build; it resumes later
        }
        env = forwarded_env()
        # As for the executor's actors: a Ray started here passes the environment on.
        if env and not (self._started and p.address is None):
            options["runtime_env"] = {"env_vars": env}
        self._task = ray.remote(_compress).options(**options)

    def __call__(self, jobs: Sequence[UnitJob]) -> Callable[[], dict[str, torch.Tensor]]:
        if self.params.gpus_per_worker == 0:
            # A worker without a GPU cannot unpickle CUDA tensors; say which option.
            on_gpu = next((j for j in jobs if j.compressor.device.type == "cuda"), None)
            if on_gpu is not None:
                raise EvocompError(
                    f"{on_gpu.unit.name}'s statistics are on {on_gpu.compressor.device}, but "
                    "executor.gpus_per_worker is 0: give each Ray worker a GPU (e.g. "
                    "gpus_per_worker: 1)"
                )
        if self._task is None:
            self._connect()
        threads = self.params.threads_per_worker
        # Largest first: a block's biggest layer (e.g. an MLP's down projection, near
        # half a Llama block's work) would otherwise start last and finish alone.
        order = sorted(range(len(jobs)), key=lambda i: -_work(jobs[i]))
        refs = {i: self._task.remote(jobs[i], threads) for i in order}

        def wait() -> dict[str, torch.Tensor]:
            tensors: dict[str, torch.Tensor] = {}
            for i, job in enumerate(jobs):
                tensors.update(self._get(refs[i], job))
            return tensors

        return wait

    def _get(self, ref: Any, job: UnitJob) -> dict[str, torch.Tensor]:
        return ray_get(self._ray, ref, f"a Ray worker died while compressing {job.unit.name}",
                       "; building again resumes at this block")

    def close(self) -> None:
        """Stop the local Ray started here, if any; safe to call more than once."""
        if self._started and self._ray.is_initialized():
            with contextlib.suppress(Exception):
                self._ray.shutdown()
        self._started = False
        self._task = None

    def __enter__(self) -> RayCompressUnits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
