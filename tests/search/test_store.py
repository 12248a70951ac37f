"""The trial store: results remembered across restarts, claims that split work
between workers sharing one study, and stale claims taken over."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from conftest import fresh_database

from evocomp.errors import EvocompError
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
        mine, waiting = alive.claim([Job(g, t, 0) for g, t in again])
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
