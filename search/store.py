"""The trial store: every evaluation of a search, in an Optuna storage, shared by
any number of workers.

Each (genome, token budget) evaluation is one Optuna trial whose value is the
fitness and whose user attributes hold the genome, token budget, all metrics,
cost and wall time. The genome is kept as one compact attribute rather than one
Optuna parameter per gene: with hundreds of genes that makes SQLite writes ~25x
cheaper (14 ms instead of 330 ms per trial, measured), and optuna samplers that
need real parameters record them themselves.

Sharing one study
-----------------
Several ``evocomp search`` processes (on one machine or many) may run the same
search on one storage: each replays the same seeded optimizer, and the store
splits every batch between them so that no candidate is evaluated twice or lost.

* **Claims.** Before evaluating, a worker *claims* each job nobody holds by
  creating a RUNNING trial for it. Optuna numbers trials in creation order
  (RDB storages lock the study row while creating a trial; a journal is one
  ordered log), so when two workers claim the same job at once, both see both
  claims afterwards and the lower trial number owns the job; the other claim is
  failed at once. A worker evaluates what it owns, completing its own trials,
  and waits for the results of jobs others own.
* **Liveness.** Workers record a heartbeat in the study every ``grace_s / 6``
  seconds. A claim whose worker has not beaten for ``grace_s`` seconds (killed,
  lost its machine) is failed by whoever waits for it, and the job is claimed
  again, so nothing is lost. Heartbeats use wall clocks: keep the workers'
  clocks synchronised to well within ``grace_s``.
* **Runs.** A worker may record the id of its run directory in its claims
  (``run_id``). A worker that knows every other process of that run directory
  has stopped (it holds the run directory's lock alone, see
  :class:`evocomp.runner.RunLock`) opens the store with ``sole_in_run``: the open
  claims of that run's other workers are dead, and are failed at once instead
  of after ``grace_s``, so ``--resume`` after ``kill -9`` starts at once.
  Claims of other run directories keep the heartbeat rule.
* **One search per study.** The study remembers its units and a signature of the
  search settings (model, data, space, compressor, evaluator, optimizer, seed);
  a worker with different settings is refused instead of mixing results.

Failed trials (lost or stale claims) are bookkeeping: only COMPLETE trials are
results, and only they appear in :meth:`TrialStore.records`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import optuna
import pandas as pd
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from evocomp.errors import EvocompError
from evocomp.spaces.base import Genome

log = logging.getLogger("evocomp")

Key = tuple[Genome, int, int]
"""What an evaluation is of: (genome, tokens, draw); draw 0 is the search split's first
sequences, draw ``d > 0`` a resampling search's ``d``-th draw of them."""

_Held = tuple[int, int, FrozenTrial]
"""A trial holding a job: (trial number, trial id, trial)."""

_T = TypeVar("_T")

_ALIVE = "evocomp:alive:"
_WAIT_LOG_S = 5.0
"""A worker waiting this long on other workers' claims says so (then every 30 s)."""
_RACES = ("UNIQUE constraint failed", "already exists", "duplicate key", "UniqueViolation")
"""What a database says when two processes create its schema (or a study) at once."""
_RESULTS = (TrialState.COMPLETE,)
_HELD = (TrialState.RUNNING, TrialState.COMPLETE)
"""A job's claims and results: the lowest trial number among them owns it."""


@dataclass(frozen=True)
class Record:
    """One evaluation: a genome at a token budget, with everything measured."""

    genome: Genome
    tokens: int
    fitness: float
    metrics: dict[str, float] = field(hash=False)
    cost: int
    seconds: float
    role: str = "candidate"  # or "baseline"
    number: int = -1
    worker: str = ""
    draw: int = 0

    @property
    def key(self) -> Key:
        return self.genome, self.tokens, self.draw

    @property
    def spent(self) -> int:
        """Evaluation tokens this evaluation scored: its budget ``tokens``, less the
        rows the evaluating process had scored for this genome before (the metric
        ``scored_tokens``, see :class:`~evocomp.evaluators.base.RowwiseEvaluator`)."""
        return int(self.metrics.get("scored_tokens", self.tokens))


@dataclass(frozen=True)
class Job:
    """An evaluation a worker may have to run: what it is of, and what the
    record will say about it before it is measured."""

    genome: Genome
    tokens: int
    cost: int
    role: str = "candidate"
    draw: int = 0

    @property
    def key(self) -> Key:
        return self.genome, self.tokens, self.draw


@dataclass(frozen=True)
class Claim:
    """This worker's right (a RUNNING trial it created) to evaluate ``job``."""

    job: Job
    trial_id: int
    number: int


def check_storage(spec: str) -> None:
    """Refuse a ``store.storage`` that cannot be opened, before a run starts: a
    ``journal:PATH`` whose folder does not exist, or a setting that is no URL."""
    if spec in ("journal", "sqlite"):
        return
    if spec.startswith("journal:"):
        folder = Path(spec.partition(":")[2]).expanduser().parent
        if not folder.is_dir():
            raise EvocompError(
                f"store.storage={spec!r}: the folder {folder} does not exist (create it first)"
            )
        return
    if "://" not in spec:
        raise EvocompError(
            f"store.storage={spec!r}: allowed: 'journal', 'journal:PATH', 'sqlite', or an "
            "SQLAlchemy URL (sqlite:///PATH, postgresql+psycopg://...)"
        )


def storage_url(spec: str, run_dir: Path) -> str | BaseStorage:
    """Resolve a storage setting: ``journal`` (the run dir's trials.journal, an
    append-only file; the default), ``journal:PATH`` (e.g. on a shared filesystem),
    ``sqlite`` (the run dir's trials.db), or any SQLAlchemy URL
    (``postgresql+psycopg://...``, ``sqlite:////shared/trials.db``).

    The journal is the default because it is cheap: 4.8 ms of bookkeeping per
    evaluation against 27.8 ms for SQLite (benchmarks/RESULTS.md), which
    matters when a candidate takes 50 ms on a GPU. SQLite databases get WAL mode,
    which halves their cost and lets several processes read while one writes."""
    if spec == "journal" or spec.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = spec.partition(":")[2] or str(run_dir / "trials.journal")
        try:
            return JournalStorage(JournalFileBackend(str(Path(path).expanduser())))
        except OSError as err:
            raise EvocompError(f"store.storage={spec!r}: cannot open {path} ({err})") from None
    url = f"sqlite:///{run_dir / 'trials.db'}" if spec == "sqlite" else spec
    if url.startswith("sqlite:"):
        return _sqlite(url)
    return url


def _sqlite(url: str) -> BaseStorage:
    """An SQLite storage in WAL mode. Creating it creates Optuna's tables, which two
    processes must not do at once (the second fails on ``alembic_version``): that
    happens under a lock file beside the database (``trials.db.lock``)."""
    import sqlalchemy
    from optuna.storages import RDBStorage

    from evocomp.paths import locked

    def wal(dbapi_conn: object, _record: object) -> None:
        cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it safe
        cur.close()

    def create() -> BaseStorage:
        storage = RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        sqlalchemy.event.listen(storage.engine, "connect", wal)
        storage.engine.dispose()  # reconnect with the pragmas
        with storage.engine.connect():  # switch to WAL now, under the lock
            pass
        return storage

    try:
        db = sqlalchemy.engine.make_url(url).database
        lock = Path(f"{db}.lock") if db and db != ":memory:" else None
        # No lock (and no folder created for it) where SQLite itself will refuse.
        if lock is None or not lock.parent.is_dir():
            return _retry_races(create)
        with locked(lock):
            return _retry_races(create)  # still retried: other programs take no lock
    except Exception as err:
        raise EvocompError(f"cannot open trial store {url!r}: {err}") from None


def _retry_races(create: Callable[[], _T], *, tries: int = 8) -> _T:
    """``create()``, tried again (after a short random pause) when it lost a race
    with another process creating the same tables or study (a unique-key error)."""
    for attempt in range(tries):
        try:
            return create()
        except Exception as err:
            if attempt == tries - 1 or not any(race in str(err) for race in _RACES):
                raise
            time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))
    raise AssertionError("unreachable")


def encode_genome(genome: Genome) -> str:
    return ",".join(map(str, genome))


def decode_genome(text: str) -> Genome:
    return tuple(int(x) for x in text.split(",")) if text else ()


def worker_name() -> str:
    """A name for this process that no other worker shares: host, pid, random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class TrialStore:
    """Evaluations of one search, remembered across restarts and shared by workers.

    Use it as a context manager while searching: that keeps the heartbeat that
    tells other workers this one is alive (see the module docstring).
    """

    def __init__(
        self,
        storage: str | BaseStorage,
        study_name: str,
        *,
        unit_names: list[str],
        metric: str,
        signature: str = "",
        grace_s: float = 60.0,
        worker: str | None = None,
        run_id: str = "",
        sole_in_run: bool = False,
    ) -> None:
        """``run_id`` names the run directory this worker searches from (recorded
        in its claims); ``sole_in_run`` says that no other process of that run is
        alive, so their open claims are taken over at once (module docstring)."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        def create() -> tuple[BaseStorage, optuna.Study]:
            # A fresh database gets its tables here: two workers starting at once
            # race on them, and the loser simply tries again.
            storage_ = optuna.storages.get_storage(storage)
            study_ = optuna.create_study(
                storage=storage_,
                study_name=study_name,
                direction="minimize",
                load_if_exists=True,
            )
            return storage_, study_

        try:
            self.storage, study = _retry_races(create)
        except Exception as err:  # SQLAlchemy/driver errors: bad URL, server down
            raise EvocompError(f"cannot open trial store {storage!r}: {err}") from None
        self.study = study
        self.study_id = self.storage.get_study_id_from_name(study_name)
        attrs = study.user_attrs
        for key, value, what in (
            ("units", unit_names, "other units"),
            ("signature", signature, "other settings (model, data, space, compressor, "
             "evaluator, search or seed)"),
        ):
            if key in attrs and attrs[key] != value:
                raise EvocompError(
                    f"trial store study {study_name!r} belongs to a search over {what}; "
                    "use a new study name (store.study) or storage"
                )
            if key not in attrs:
                study.set_user_attr(key, value)
        if "metric" not in attrs:
            study.set_user_attr("metric", metric)
        self.metric = metric
        self.grace_s = grace_s
        self.worker = worker or worker_name()
        self.run_id = run_id
        self._index: dict[Key, Record] = {}
        self._seen: set[int] = set()
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self.refresh()
        if sole_in_run and run_id:
            self._take_over_run()

    # -- results -------------------------------------------------------------------
    def refresh(self) -> None:
        """Take in results other workers completed since the last look."""
        for trial in self.storage.get_all_trials(self.study_id, deepcopy=False, states=_RESULTS):
            if trial._trial_id not in self._seen:
                self._seen.add(trial._trial_id)
                rec = _to_record(trial)
                # Two completions of one job can only come from stores written before
                # claims existed; the first one stands.
                self._index.setdefault(rec.key, rec)

    def lookup(self, genome: Genome, tokens: int, draw: int = 0) -> Record | None:
        return self._index.get((genome, tokens, draw))

    def records(self) -> list[Record]:
        return sorted(self._index.values(), key=lambda r: r.number)

    def __len__(self) -> int:
        return len(self._index)

    # -- claims --------------------------------------------------------------------
    def claim(
        self, jobs: Sequence[Job], *, limit: int | None = None
    ) -> tuple[list[Claim], list[Key]]:
        """Claim (at most ``limit`` of) the jobs that have no result and no claim yet.
        Returns the claims this worker owns (to evaluate and :meth:`complete`) and
        the keys of unfinished jobs another worker holds (:meth:`wait`). Claiming a
        few jobs at a time lets workers share one batch."""
        self.refresh()
        held = self._claims()
        mine: list[tuple[Job, int]] = []
        others: list[Key] = []
        for job in dict((j.key, j) for j in jobs).values():
            if job.key in self._index:
                continue
            if job.key in held:
                others.append(job.key)
                continue
            if limit is not None and len(mine) >= limit:
                continue
            template = optuna.trial.create_trial(
                state=TrialState.RUNNING, user_attrs=self._claim_attrs(job)
            )
            mine.append((job, self.storage.create_new_trial(self.study_id, template)))
        if not mine:
            return [], others
        # Everyone who claimed one of these jobs before us is visible now: the
        # lowest trial number holding a job owns it.
        ours = {encode_genome(job.genome) for job, _ in mine}
        holders: dict[Key, list[_Held]] = {}
        for t in self.storage.get_all_trials(self.study_id, deepcopy=False, states=_HELD):
            if t.user_attrs.get("genome") in ours:
                holders.setdefault(_key(t.user_attrs), []).append((t.number, t._trial_id, t))
        won: list[Claim] = []
        for job, trial_id in mine:
            number, owner, _ = min(holders[job.key])
            if owner == trial_id:
                won.append(Claim(job, trial_id, number))
            else:
                self._fail(trial_id)
                others.append(job.key)
        return won, others

    def complete(
        self, claim: Claim, fitness: float, metrics: dict[str, float], seconds: float
    ) -> Record:
        """Record the result of a job this worker owns."""
        # Optuna rejects non-finite values; a diverged candidate is stored as 1e30.
        value = fitness if math.isfinite(fitness) else 1e30
        job = claim.job
        trial_id, number = claim.trial_id, claim.number
        try:
            # One attribute (one write) for everything measured.
            result = {"metrics": metrics, "seconds": seconds}
            self.storage.set_trial_user_attr(trial_id, "result", result)
            self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])
        except UpdateFinishedTrialError:
            # Another worker judged this one dead (silent past grace_s) and failed the
            # claim; the result is still good, so it is recorded as a trial of its own.
            log.warning("claim %d was taken over by another worker; recording anyway", number)
            trial_id = self.storage.create_new_trial(
                self.study_id,
                optuna.trial.create_trial(
                    value=value,
                    user_attrs={**self._claim_attrs(job), "result": result},
                ),
            )
            number = self.storage.get_trial_number_from_id(trial_id)
        rec = Record(  # with the stored value, so every worker and every replay agree
            genome=job.genome,
            tokens=job.tokens,
            fitness=value,
            metrics=metrics,
            cost=job.cost,
            seconds=seconds,
            role=job.role,
            number=number,
            worker=self.worker,
            draw=job.draw,
        )
        self._seen.add(trial_id)
        self._index[job.key] = rec
        return rec

    def release(self, claims: Sequence[Claim]) -> None:
        """Give up claims (an evaluation failed or was interrupted): others may take them."""
        for claim in claims:
            self._fail(claim.trial_id)

    def wait(self, keys: Sequence[Key], *, poll_s: float = 0.05) -> list[Key]:
        """Block until every job in ``keys`` has a result, or its claim is gone or
        stale. Returns the keys that need claiming again (their owner failed)."""
        pending = [k for k in keys if k not in self._index]
        delay = poll_s
        started = time.monotonic()
        say_at = started + _WAIT_LOG_S
        while pending:
            self.refresh()
            pending = [k for k in pending if k not in self._index]
            if not pending:
                break
            held = self._claims()
            alive = self._last_seen(held)
            orphaned = []
            holders: dict[str, int] = {}
            for key in pending:
                claims = held.get(key, [])
                live = [c for c in claims if self._is_live(c[2], alive)]
                for c in claims:
                    if c not in live:
                        self._fail(c[1])
                if not live:
                    orphaned.append(key)
                for c in live[:1]:
                    worker = c[2].user_attrs.get("worker", "")
                    holders[worker] = holders.get(worker, 0) + 1
            if orphaned:
                self.refresh()  # an owner may have finished just before we looked
                return [k for k in orphaned if k not in self._index]
            if time.monotonic() >= say_at:
                self._say_waiting(holders, alive, time.monotonic() - started)
                say_at = time.monotonic() + 30.0
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        return []

    def _say_waiting(self, holders: dict[str, int], alive: dict[str, float], waited: float) -> None:
        """Log who this worker has been waiting for, and when their claims would be
        taken over if they stay silent (they may well be busy and alive)."""
        now = time.time()
        for worker, count in sorted(holders.items()):
            seen = alive.get(worker, now)
            until = time.strftime("%H:%M:%S", time.localtime(seen + self.grace_s))
            log.info(
                "waited %.0f s for %d job(s) claimed by worker %s (last sign of life %.0f s "
                "ago); if it stays silent its claims are taken over at %s (store.grace_s=%g)",
                waited, count, worker, now - seen, until, self.grace_s,
            )

    def _claims(self) -> dict[Key, list[_Held]]:
        """Open claims per job."""
        out: dict[Key, list[_Held]] = {}
        running = (TrialState.RUNNING,)
        for t in self.storage.get_all_trials(self.study_id, deepcopy=False, states=running):
            a = t.user_attrs
            if "genome" in a:
                out.setdefault(_key(a), []).append((t.number, t._trial_id, t))
        return out

    def _claim_attrs(self, job: Job) -> dict[str, object]:
        attrs: dict[str, object] = {
            "genome": encode_genome(job.genome),
            "tokens": job.tokens,
            "cost": job.cost,
            "role": job.role,
            "worker": self.worker,
        }
        if job.draw:  # absent in stores of searches that never resample
            attrs["draw"] = job.draw
        if self.run_id:
            attrs["run"] = self.run_id
        return attrs

    def _take_over_run(self) -> None:
        """Fail every open claim that another worker of this run made: this worker
        was told it is the run's only live process, so they all stopped (killed)."""
        dead: dict[str, int] = {}
        for t in self.storage.get_all_trials(
            self.study_id, deepcopy=False, states=(TrialState.RUNNING,)
        ):
            a = t.user_attrs
            if a.get("run") == self.run_id and a.get("worker", "") != self.worker:
                self._fail(t._trial_id)
                dead[a.get("worker", "")] = dead.get(a.get("worker", ""), 0) + 1
        for worker, count in sorted(dead.items()):
            # Its heartbeat is void too, so nobody counts it among the live workers.
            self.storage.set_study_system_attr(self.study_id, _ALIVE + worker, 0.0)
            log.info(
                "taking over %d job(s) claimed by worker %s at once: it searched from "
                "this run directory, and no other process of it is alive", count, worker,
            )

    def _fail(self, trial_id: int) -> None:
        # Finished meanwhile (completed by its owner, or failed by another waiter): fine.
        with contextlib.suppress(UpdateFinishedTrialError):
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)

    # -- liveness ------------------------------------------------------------------
    def alive_workers(self) -> list[str]:
        """The workers (this one included) that beat within the last ``grace_s``."""
        now = time.time()
        return sorted(w for w, t in self._alive().items() if now - t < self.grace_s)

    def _alive(self) -> dict[str, float]:
        attrs = self.storage.get_study_system_attrs(self.study_id)
        return {k[len(_ALIVE):]: float(v) for k, v in attrs.items() if k.startswith(_ALIVE)}

    def _last_seen(self, held: dict[Key, list[_Held]]) -> dict[str, float]:
        """When each worker holding claims was last known alive: its heartbeat, or,
        for one that never beat, its latest claim (a worker is alive when it claims,
        so all its claims go stale together)."""
        seen = self._alive()
        claimed: dict[str, float] = {}
        for claims in held.values():
            for _, _, trial in claims:
                worker = trial.user_attrs.get("worker", "")
                start = trial.datetime_start
                if worker not in seen and start is not None:
                    claimed[worker] = max(claimed.get(worker, 0.0), start.timestamp())
        return {**claimed, **seen}

    def _is_live(self, trial: FrozenTrial, alive: dict[str, float]) -> bool:
        worker = trial.user_attrs.get("worker", "")
        if worker == self.worker:
            return True
        now = time.time()
        return now - alive.get(worker, now) < self.grace_s

    def _beat(self) -> None:
        self.storage.set_study_system_attr(self.study_id, _ALIVE + self.worker, time.time())

    def _beat_loop(self) -> None:
        while not self._beat_stop.wait(self.grace_s / 6):
            # A storage hiccup must not kill the search; the next beat retries.
            with contextlib.suppress(Exception):
                self._beat()

    def __enter__(self) -> TrialStore:
        self._beat()
        self._beat_stop.clear()
        self._beat_thread = threading.Thread(target=self._beat_loop, daemon=True)
        self._beat_thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join()

    # -- export --------------------------------------------------------------------
    def to_dataframe(self) -> pd.DataFrame:
        """One row per evaluation: number, role, tokens (its budget), spent (the tokens
        it scored, :attr:`Record.spent`), draw, fitness, cost, seconds, worker, every
        metric, and the genome as a string."""
        rows = [
            {
                "number": r.number,
                "role": r.role,
                "tokens": r.tokens,
                "spent": r.spent,
                "draw": r.draw,
                "fitness": r.fitness,
                "cost": r.cost,
                "seconds": r.seconds,
                "worker": r.worker,
                **{f"metric.{k}": v for k, v in r.metrics.items()},
                "genome": encode_genome(r.genome),
            }
            for r in self.records()
        ]
        return pd.DataFrame(rows)


def at_final_fidelity(trials: pd.DataFrame) -> pd.Series:
    """Which rows of a trials table (:meth:`TrialStore.to_dataframe`) are at its
    largest token budget on the search sequences in their stored order (draw 0):
    the scores that compare with each other (a resampling search scores its
    generations on other draws; tables written before draws existed have none)."""
    mask = trials.tokens == trials.tokens.max()
    return mask & (trials.draw == 0) if "draw" in trials else mask


def _key(attrs: dict[str, Any]) -> Key:
    return decode_genome(attrs["genome"]), int(attrs["tokens"]), int(attrs.get("draw", 0))


def _to_record(trial: FrozenTrial) -> Record:
    a = trial.user_attrs
    result = a.get("result", a)  # stores written before claims kept these at the top level
    return Record(
        genome=decode_genome(a["genome"]),
        tokens=int(a["tokens"]),
        fitness=float(trial.value) if trial.value is not None else float("inf"),
        metrics=dict(result.get("metrics", {})),
        cost=int(a.get("cost", 0)),
        seconds=float(result.get("seconds", 0.0)),
        role=str(a.get("role", "candidate")),
        number=trial.number,
        worker=str(a.get("worker", "")),
        draw=int(a.get("draw", 0)),
    )
