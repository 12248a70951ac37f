"""The trial store: results remembered across restarts, claims that split work
between workers sharing one study, and stale claims taken over."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from pathlib import Path

import optuna
import pytest
from conftest import fresh_database

from evocomp.errors import EvocompError
from evocomp.search import store as store_module
from evocomp.search.store import Job, TrialStore, storage_url

UNITS = ["a", "b", "c"]


def open_store(url: str, **kw) -> TrialStore:
    return TrialStore(url, "s", unit_names=UNITS, metric="kl", signature="sig", **kw)


def jobs(n: int, tokens: int = 64) -> list[Job]:
    return [Job((i, 0, 1), tokens, cost=10 + i) for i in range(n)]


@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def url(request, tmp_path):
    """The same study opened by every store that uses it."""
    spec = request.param
    if spec == "sqlite":
        return f"sqlite:///{tmp_path / 'trials.db'}"
    if spec == "journal":
        return str(tmp_path / "trials.journal")
    return fresh_database(request.getfixturevalue("postgres_url"))


def make(url: str, **kw) -> TrialStore:
    # A journal path is resolved for each store: JournalStorage objects are per process.
    storage = url if "://" in url else storage_url(f"journal:{url}", None)
    return open_store(storage, **kw)


def test_completed_jobs_are_remembered_after_reopening(url):
    store = make(url)
    mine, others = store.claim(jobs(3))
    assert [c.job for c in mine] == jobs(3) and others == []
    for i, claim in enumerate(mine):
        store.complete(claim, 0.5 + i, {"kl": 0.5 + i, "ppl": 9.0}, 1.25)
    again = make(url)
    assert len(again) == 3
    rec = again.lookup((1, 0, 1), 64)
    assert (rec.fitness, rec.cost, rec.seconds) == (1.5, 11, 1.25)
    assert rec.metrics == {"kl": 1.5, "ppl": 9.0}
    assert again.lookup((1, 0, 1), 128) is None  # another token budget is another job
    df = again.to_dataframe()
    assert list(df.fitness) == [0.5, 1.5, 2.5] and df.worker.nunique() == 1
    # Claiming known jobs claims nothing.
    assert again.claim(jobs(3)) == ([], [])


def test_a_second_worker_waits_for_jobs_the_first_holds(url):
    first, second = make(url), make(url)
    mine, _ = first.claim(jobs(2))
    theirs, waiting = second.claim(jobs(3))
    assert [c.job for c in theirs] == [jobs(3)[2]]  # only the job nobody held
    assert sorted(waiting) == sorted(j.key for j in jobs(2))

    def finish() -> None:
        time.sleep(0.3)
        for claim in mine:
            first.complete(claim, 1.0, {"kl": 1.0}, 0.1)

    t = threading.Thread(target=finish)
    t.start()
    assert second.wait(waiting) == []
    t.join()
    assert second.lookup(*jobs(2)[1].key).fitness == 1.0


def test_simultaneous_claims_are_won_by_the_first_created(url, monkeypatch):
    first, second = make(url), make(url)
    # The second worker looked for open claims before the first made its own.
    monkeypatch.setattr(second, "_claims", dict)
    mine, _ = first.claim(jobs(1))
    theirs, waiting = second.claim(jobs(1))
    assert len(mine) == 1 and theirs == [] and waiting == [jobs(1)[0].key]
    states = [t.state for t in first.study.get_trials()]
    assert states == [optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL]


def test_a_dead_workers_claims_are_taken_over_after_the_grace_period(url):
    dead = make(url, grace_s=0.5)  # claims, then never beats or completes
    claimed = time.time()
    dead.claim(jobs(2))
    alive = make(url, grace_s=0.5)
    with alive:
        mine, waiting = alive.claim(jobs(2))
        assert mine == [] and len(waiting) == 2
        again = alive.wait(waiting)
        assert sorted(again) == sorted(waiting) and time.time() - claimed >= 0.5
        mine, waiting = alive.claim([Job(g, t, 0, draw=d) for g, t, d in again])
        assert len(mine) == 2 and waiting == []
        for claim in mine:
            alive.complete(claim, 2.0, {"kl": 2.0}, 0.1)
    assert len(make(url)) == 2


def test_a_live_worker_keeps_its_claims_while_it_beats(url):
    busy = make(url, grace_s=0.6)
    waiter = make(url, grace_s=0.6)
    with busy:
        mine, _ = busy.claim(jobs(1))

        def finish() -> None:
            time.sleep(1.5)  # longer than the grace period, but beating all along
            busy.complete(mine[0], 3.0, {"kl": 3.0}, 1.5)

        t = threading.Thread(target=finish)
        t.start()
        assert waiter.wait([jobs(1)[0].key]) == []
        t.join()
    assert waiter.lookup(*jobs(1)[0].key).fitness == 3.0


def test_a_slow_worker_whose_claim_was_taken_still_records_its_result(url):
    slow = make(url, grace_s=0.2)
    (claim,), _ = slow.claim(jobs(1))
    other = make(url, grace_s=0.2)
    time.sleep(0.3)
    assert other.wait([claim.job.key]) == [claim.job.key]  # failed the silent claim
    rec = slow.complete(claim, 4.0, {"kl": 4.0}, 0.1)
    assert rec.fitness == 4.0 and make(url).lookup(*claim.job.key).fitness == 4.0


def test_released_claims_can_be_claimed_again(url):
    first = make(url)
    mine, _ = first.claim(jobs(2))
    first.release(mine)
    second = make(url)
    theirs, waiting = second.claim(jobs(2))
    assert len(theirs) == 2 and waiting == []


def test_non_finite_fitness_is_stored_as_a_large_value_everyone_agrees_on(url):
    store = make(url)
    (claim,), _ = store.claim(jobs(1))
    assert store.complete(claim, float("nan"), {"kl": float("nan")}, 0.1).fitness == 1e30
    assert make(url).lookup(*claim.job.key).fitness == 1e30


def test_a_study_of_another_search_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    open_store(url)
    with pytest.raises(EvocompError, match="other settings"):
        TrialStore(url, "s", unit_names=UNITS, metric="kl", signature="other")
    with pytest.raises(EvocompError, match="other units"):
        TrialStore(url, "s", unit_names=["x"], metric="kl", signature="sig")


def test_an_unreachable_storage_is_a_clear_error():
    with pytest.raises(EvocompError, match="cannot open trial store"):
        open_store("postgresql+psycopg://nobody@127.0.0.1:1/none")


def test_two_workers_share_a_postgresql_study(postgres_url):
    """The claim protocol on a real server: two stores claim overlapping batches
    from two threads; every job is evaluated exactly once."""
    url = fresh_database(postgres_url)
    stores = [open_store(url) for _ in range(2)]
    work = jobs(24)
    evaluated: list[list[tuple]] = [[], []]

    def worker(k: int) -> None:
        store = stores[k]
        with store:
            pending = [j.key for j in work]
            while pending:
                mine, held = store.claim(work, limit=2)
                for claim in mine:
                    evaluated[k].append(claim.job.key)
                    time.sleep(0.01)
                    store.complete(claim, float(claim.job.genome[0]), {"kl": 0.0}, 0.01)
                if not mine and held:
                    store.wait(held)
                pending = [k for k in pending if store.lookup(*k) is None]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = evaluated[0] + evaluated[1]
    assert sorted(done) == sorted(j.key for j in work)  # each exactly once
    assert evaluated[0] and evaluated[1]  # and both took a share
    fresh = open_store(url)
    assert len(fresh) == 24
    complete = fresh.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 24


# -- opening at once, runs stopped, long waits ----------------------------------------

def _open_at_once(urls: list[str], root: str, barrier, results) -> None:
    """In each of several processes: open each store the moment all are ready."""
    for r, url in enumerate(urls):
        barrier.wait()  # everyone opens the store at once
        try:
            store = open_store(storage_url(url, Path(root)))
            results.put((r, store.study_id, ""))
        except Exception as err:
            results.put((r, None, repr(err)))


@pytest.mark.parametrize("backend", ["sqlite", "journal", "postgresql"])
def test_a_fresh_store_opened_by_many_processes_at_once_holds_one_study(
    backend, tmp_path, request
):
    """Two processes creating a fresh SQLite store at once used to fail on Optuna's
    schema (``UNIQUE constraint failed: alembic_version``)."""
    n, rounds = 4, 3
    if backend == "sqlite":
        urls = [f"sqlite:///{tmp_path / f'r{r}.db'}" for r in range(rounds)]
    elif backend == "journal":
        urls = [f"journal:{tmp_path / f'r{r}.journal'}" for r in range(rounds)]
    else:
        server = request.getfixturevalue("postgres_url")
        urls = [fresh_database(server) for _ in range(rounds)]
    # Forked, so that they start with everything imported and race on the store alone
    # (a store opened here first imports what opening an SQL store needs).
    open_store(storage_url(f"sqlite:///{tmp_path / 'warm.db'}", tmp_path))
    mp = multiprocessing.get_context("fork")
    barrier, results = mp.Barrier(n), mp.Queue()
    procs = [
        mp.Process(target=_open_at_once, args=(urls, str(tmp_path), barrier, results))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    seen = [results.get(timeout=120) for _ in range(n * rounds)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for r, url in enumerate(urls):
        opened = [(study, err) for k, study, err in seen if k == r]
        assert len(opened) == n and not any(err for _, err in opened), opened
        assert len({study for study, _ in opened}) == 1
        assert optuna.get_all_study_names(storage_url(url, tmp_path)) == ["s"]


def test_claims_of_a_stopped_run_are_taken_over_at_once(url, caplog):
    """A worker that holds its run directory's lock alone (so every other process
    of that run has stopped) fails their open claims when it opens the store,
    without waiting ``grace_s``; claims of other runs keep the heartbeat rule."""
    killed = make(url, run_id="run-a", grace_s=600)
    killed.claim(jobs(2))
    elsewhere = make(url, run_id="run-b", grace_s=600)  # another run dir, alive
    with elsewhere:
        elsewhere.claim([jobs(3)[2]])
        with caplog.at_level(logging.INFO, logger="evocomp"):
            resumed = make(url, run_id="run-a", sole_in_run=True, grace_s=600)
        assert f"taking over 2 job(s) claimed by worker {killed.worker}" in caplog.text
        mine, waiting = resumed.claim(jobs(3))
        assert [c.job for c in mine] == jobs(2) and waiting == [jobs(3)[2].key]
        assert killed.worker not in resumed.alive_workers()
        assert elsewhere.worker in resumed.alive_workers()
        # The new claims carry the run's id too, for the next resume.
        running = resumed.study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        assert {t.user_attrs["run"] for t in running} == {"run-a", "run-b"}
    # A worker of the run that is not alone (another process of it lives) takes nothing.
    joined = make(url, run_id="run-a", grace_s=600)
    assert joined.claim(jobs(2)) == ([], [j.key for j in jobs(2)])


def test_a_long_wait_on_other_workers_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(store_module, "_WAIT_LOG_S", 0.2)
    url = f"sqlite:///{tmp_path / 'trials.db'}"
    busy, waiter = make(url, grace_s=600), make(url, grace_s=600)
    with busy:
        (claim,), _ = busy.claim(jobs(1))
        t = threading.Timer(0.6, busy.complete, (claim, 1.0, {"kl": 1.0}, 0.6))
        t.start()
        with caplog.at_level(logging.INFO, logger="evocomp"):
            assert waiter.wait([claim.job.key]) == []
        t.join()
    assert f"for 1 job(s) claimed by worker {busy.worker}" in caplog.text
    assert "taken over at" in caplog.text and "store.grace_s=600" in caplog.text
