"""Executors: WHERE candidates are evaluated, in this process or on a pool of Ray actors.

An executor maps an :class:`Evaluation` (a picklable callable that scores one
genome at a token budget) over a batch of :class:`~evocomp.search.base.Request`
jobs and yields each one's metrics as soon as it is known, in any order, so the
caller can record results while the rest are still running. Like Optuna's
``Study.optimize(func)``, an executor never learns how a genome is evaluated:
the application hands it the callable.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import Field

from evocomp.errors import EvocompError
from evocomp.registry import Registry, StrictModel
from evocomp.search.base import Request, Training
from evocomp.spaces.base import Genome

if TYPE_CHECKING:
    from evocomp.supernet.database import CompressUnits

log = logging.getLogger("evocomp")

Result = tuple[int, dict[str, float], float]
"""``(index into the jobs, metrics, seconds the evaluation took)``."""


class Evaluation(ABC):
    """Scores one genome on the first ``tokens`` evaluation tokens: the callable
    executors map over requests.

    It must pickle cheaply (a config, not a model): a Ray worker unpickles its own
    copy, calls :meth:`setup` once, then calls it for each job it is given. The
    caller's own copy may hold what it has built already.
    """

    device: str = "cpu"
    """The device the evaluating model lives on (executors check their resources)."""

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Build what evaluating needs in this process (model, database, dense
        outputs), so that failures show before the first job; idempotent."""

    @abstractmethod
    def __call__(
        self, genome: Genome, tokens: int | None, train: Training | None = None, draw: int = 0
    ) -> tuple[dict[str, float], float]:
        """``(metrics, seconds the evaluation took)`` of ``genome`` at ``tokens``
        (``None``: every evaluation token) of the ``draw``-th draw of the search
        sequences (:attr:`Request.draw`), fine-tuned first as ``train`` says (and
        the trained weights discarded after scoring) when it is given."""


class ExecutorParams(StrictModel):
    """Options of :class:`Executor`."""


P = TypeVar("P", bound=ExecutorParams)


class Executor(ABC, Generic[P]):
    """Maps an :class:`Evaluation` over batches of jobs.

    ``map(jobs)`` evaluates every job exactly once and yields
    ``(index, metrics, seconds)`` as each finishes, in any order. Use an executor
    as a context manager (or call :meth:`close`) to release what it holds.
    """

    name: ClassVar[str]
    Params: ClassVar[type[ExecutorParams]] = ExecutorParams

    def __init__(self, evaluation: Evaluation, params: P) -> None:
        self.evaluation = evaluation
        self.params: P = params

    @classmethod
    def check(cls, params: Any, *, device: str) -> None:
        """Called before a run starts, with the options (a ``cls.Params``) and the
        evaluating model's device: refuse settings that cannot work, with a message
        naming the option. Every setting works in process."""
        return None

    @classmethod
    def compress_units(cls, params: Any) -> AbstractContextManager[CompressUnits | None]:
        """Where a variant database build with these options (a ``cls.Params``)
        compresses its units: a :class:`~evocomp.supernet.database.CompressUnits`
        released on leaving the context, or None (the default) for in process."""
        return nullcontext(None)

    @property
    def workers(self) -> int:
        """How many jobs run at once; batches of at least this size keep it busy."""
        return 1

    @abstractmethod
    def map(self, jobs: Sequence[Request]) -> Iterator[Result]:
        """Evaluate every job; yield ``(index into jobs, metrics, seconds)`` as each
        finishes, in any order."""

    def close(self) -> None:
        """Release workers and connections; safe to call more than once."""
        return None  # nothing to release in process

    def __enter__(self) -> Executor[P]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


EXECUTORS: Registry[type[Executor[Any]]] = Registry("executor", Executor)


@EXECUTORS.register("local")
class LocalExecutor(Executor[ExecutorParams]):
    """Evaluates jobs one after another in this process."""

    name = "local"

    def map(self, jobs: Sequence[Request]) -> Iterator[Result]:
        for index, job in enumerate(jobs):
            metrics, seconds = self.evaluation(job.genome, job.tokens, job.train, job.draw)
            yield index, metrics, seconds


# Environment the actors need to resolve the same caches as the driver: Ray workers
# of a cluster (or of a Ray started before the driver changed its environment) do
# not inherit it.
_FORWARDED_PREFIXES = ("EVOCOMP_",)
_FORWARDED_NAMES = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def forwarded_env() -> dict[str, str]:
    """The driver's environment variables that Ray actors get: ``EVOCOMP_*``
    (e.g. ``EVOCOMP_CACHE``) and the Hugging Face cache / offline switches."""
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith(_FORWARDED_PREFIXES) or k in _FORWARDED_NAMES
    }


def start_ray(address: str | None, *, who: str, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray, quietly: keep a Ray already initialised here,
    start a fresh local one (``address`` None; ``num_cpus`` sized), or join a
    cluster (``"auto"``, ``"ray://host:port"``). Returns whether Ray was started or
    joined here, i.e. whether the caller should ``ray.shutdown()`` when done."""
    import ray

    if ray.is_initialized():
        return False  # someone else's Ray: use it, and leave it running
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        # Ray warns on every start that it chose token authentication by default;
        # the choice is right (keep it) and the warning is noise in every run.
        auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = auth_log.level
        auth_log.setLevel(logging.ERROR)
        try:
            # "local", not $RAY_ADDRESS: no address means a fresh local instance.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
        finally:
            auth_log.setLevel(level)
        return True
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise EvocompError(f"{who} cannot join the Ray cluster at {address!r}: {err}") from None
    return True


def ray_get(ray: Any, ref: Any, died: str, then: str = "") -> Any:
    """``ray.get(ref)`` with failures turned into what the caller can act on: an
    :class:`EvocompError` raised by the task is raised again as it was; a worker or
    node that died (killed, out of memory, lost) becomes an EvocompError saying
    ``died``, where the logs are, and ``then``."""
    exc = ray.exceptions
    try:
        return ray.get(ref)
    except exc.RayTaskError as err:
        if isinstance(err.cause, EvocompError):
            raise err.cause from None
        raise  # a bug: keep the worker's traceback, which the error carries
    except exc.RayError as err:
        raise EvocompError(
            f"{died}: {err}\n(out of memory? the workers' logs are in Ray's session "
            f"directory, e.g. /tmp/ray/session_latest/logs){then}"
        ) from err


class RayExecutorParams(ExecutorParams):
    """Options of :class:`RayExecutor`."""

    num_workers: int = Field(
        2, ge=1,
        description="Ray actors, each with a model replica (a local Ray also runs this many "
        "database-build tasks at once)",
    )
    gpus_per_worker: float = Field(
        0, ge=0, description="GPUs per actor (fractions share a GPU); 0: CPU only"
    )
    cpus_per_worker: float = Field(
        1, gt=0, description="CPUs Ray reserves per actor (and per database-build task)"
    )
    threads_per_worker: int = Field(
        1,
        ge=1,
        description="torch threads per actor (and per database-build task); with several "
        "actors per machine, threads x workers <= cores avoids thread contention",
    )
    address: str | None = Field(
        None,
        description="null: start a local Ray sized for the workers; "
        "'auto' or 'ray://host:port': join an existing cluster",
    )


@EXECUTORS.register("ray")
class RayExecutor(Executor[RayExecutorParams]):
    """Evaluates jobs on a pool of long-lived Ray actors, one job per actor at a time.

    Each actor unpickles its own copy of the :class:`Evaluation` and sets it up
    (for an experiment: a model replica, the memory-mapped variant database and the
    cached dense reference outputs) on its own device (with ``gpus_per_worker > 0``
    Ray sets ``CUDA_VISIBLE_DEVICES``, so ``model.device: cuda`` is the actor's
    GPU). The driver sets the evaluation up first (this constructor makes sure of
    it), so actors only open what it built and two actors never build the same
    files.

    Actors get the driver's ``EVOCOMP_*`` and Hugging Face cache variables (see
    :func:`forwarded_env`) and its working directory when it exists on their
    machine, so paths in the config resolve as on the driver; on a multi-node
    cluster those paths must be on a shared filesystem.

    With ``address: null`` a local Ray instance sized for the workers is started
    (and stopped by :meth:`close`); ``"auto"`` or ``"ray://host:port"`` joins a
    cluster. If Ray is already initialised in this process (e.g. inside a Ray Tune
    trial) it is used as it is and left running.

    The same options spread a variant database build over Ray tasks
    (:meth:`compress_units`).

    A worker that dies (killed, out of memory, lost node) makes :meth:`map` raise
    :class:`~evocomp.errors.EvocompError`; an :class:`~evocomp.errors.EvocompError`
    raised while evaluating is re-raised as is, and any other exception keeps the
    actor's traceback.
    """

    name = "ray"

    Params = RayExecutorParams

    def __init__(self, evaluation: Evaluation, params: RayExecutorParams) -> None:
        super().__init__(evaluation, params)
        try:
            import ray
        except ImportError:
            raise EvocompError("executor 'ray' needs Ray: pip install 'evocomp[ray]'") from None
        self._ray = ray
        self._started = False
        self._actors: list[Any] = []
        self.check(params, device=evaluation.device)
        # Built (or opened) here first, so that actors never build them concurrently.
        evaluation.setup()
        try:
            self._connect()
            self._spawn()
        except BaseException:
            self.close()
            raise

    @classmethod
    def check(cls, params: RayExecutorParams, *, device: str) -> None:
        """A CUDA model needs GPUs per worker, and each worker sees only its own."""
        _check_device(params, device)

    @classmethod
    def compress_units(
        cls, params: RayExecutorParams
    ) -> AbstractContextManager[CompressUnits | None]:
        """Tasks on Ray workers sized like the actors (see
        :class:`~evocomp.search.build.RayCompressUnits`); Ray starts on the first
        block to build."""
        from evocomp.search.build import RayCompressUnits  # it imports this module

        return RayCompressUnits(params)

    @property
    def workers(self) -> int:
        return self.params.num_workers

    def _connect(self) -> None:
        p = self.params
        self._started = start_ray(
            p.address,
            who="executor 'ray'",
            num_cpus=max(1, math.ceil(p.num_workers * p.cpus_per_worker)),
        )
        need = p.num_workers * p.gpus_per_worker
        have = self._ray.cluster_resources().get("GPU", 0)
        if self._started and p.address is None and need > have:
            # Otherwise the actors would wait forever for GPUs.
            raise EvocompError(
                f"executor 'ray' needs {p.num_workers} workers x {p.gpus_per_worker:g} GPU "
                f"= {need:g} GPUs; this machine has {have:g}"
            )

    def _spawn(self) -> None:
        ray, p = self._ray, self.params
        options: dict[str, Any] = {
            "num_cpus": p.cpus_per_worker,
            "num_gpus": p.gpus_per_worker,
            "max_restarts": 0,  # a restarted replica would silently drop its job
        }
        env = forwarded_env()
        # A Ray this executor just started locally passes the driver's environment on
        # to its workers; a runtime env would only cost each actor seconds to set up.
        if env and not (self._started and p.address is None):
            options["runtime_env"] = {"env_vars": env}
        actor_cls = ray.remote(_Worker).options(**options)
        self._actors = [
            actor_cls.remote(self.evaluation, p.threads_per_worker, os.getcwd())
            for _ in range(p.num_workers)
        ]
        # Wait for every replica here, so that loading models is not counted as the
        # first jobs' time and a worker that cannot start fails before the search.
        pending = {a.ready.remote(): w for w, a in enumerate(self._actors)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=120)
            if not done:
                log.warning(
                    "waiting for %d of %d Ray workers to start (each needs %g CPU, %g GPU)",
                    len(pending),
                    p.num_workers,
                    p.cpus_per_worker,
                    p.gpus_per_worker,
                )
            for ref in done:
                self._get(ref, pending.pop(ref), "starting")
        log.info("ray executor: %d workers ready", p.num_workers)

    def _get(self, ref: Any, worker: int, doing: str) -> Any:
        return ray_get(self._ray, ref, f"Ray worker {worker} of {len(self._actors)} died "
                       f"while {doing}")

    def map(self, jobs: Sequence[Request]) -> Iterator[Result]:
        if not self._actors:
            raise EvocompError("executor 'ray' is closed")
        queue = deque(enumerate(jobs))
        running: dict[Any, tuple[int, int]] = {}  # ref -> (job index, worker)

        def submit(worker: int) -> None:
            index, job = queue.popleft()
            ref = self._actors[worker].evaluate.remote(
                job.genome, job.tokens, job.train, job.draw
            )
            running[ref] = (index, worker)

        for worker in range(min(len(self._actors), len(queue))):
            submit(worker)
        while running:
            (ref,), _ = self._ray.wait(list(running), num_returns=1)
            index, worker = running.pop(ref)
            metrics, seconds = self._get(ref, worker, f"evaluating job {index}")
            if queue:  # before yielding, so the worker computes while the caller records
                submit(worker)
            yield index, metrics, seconds
        # A caller that stops early leaves jobs running; their results are dropped.

    def close(self) -> None:
        ray = self._ray
        for actor in self._actors:
            # An actor already dead, or a Ray already gone, has nothing left to free.
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self._actors = []
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False


def _check_device(params: RayExecutorParams, device: str) -> None:
    if device.startswith("cuda") and params.gpus_per_worker == 0:
        raise EvocompError(
            f"model.device is {device!r} but executor.gpus_per_worker is 0: give each Ray "
            "worker a GPU (e.g. gpus_per_worker: 1, or 0.5 for two workers per GPU)"
        )
    if params.gpus_per_worker > 0 and device not in ("cuda", "cuda:0", "cpu"):
        raise EvocompError(
            f"model.device is {device!r}, but each Ray worker sees only its own GPU(s): "
            "use model.device=cuda"
        )


class _Worker:
    """One Ray actor: its own copy of the evaluation (e.g. a model replica)."""

    def __init__(self, evaluation: Evaluation, threads: int, cwd: str) -> None:
        self.error: BaseException | None = None
        self.evaluations = 0
        self.evaluation = evaluation
        try:
            if os.path.isdir(cwd):  # relative paths in the config mean the driver's
                os.chdir(cwd)
            import torch

            torch.set_num_threads(threads)
            evaluation.setup()
        except Exception as err:
            # Raised from ready() instead: an exception in an actor's constructor
            # reaches the driver as an ActorDiedError that has lost its type.
            self.error = err

    def ready(self) -> int:
        if self.error is not None:
            raise self.error
        return os.getpid()

    def evaluate(
        self, genome: Genome, tokens: int | None, train: Training | None = None, draw: int = 0
    ) -> tuple[dict[str, float], float]:
        self.evaluations += 1
        return self.evaluation(genome, tokens, train, draw)

    def count(self) -> int:
        """Evaluations done so far (for tests)."""
        return self.evaluations
