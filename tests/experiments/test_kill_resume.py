"""A search killed with SIGKILL resumes at once: the run lock tells the resuming
process that the killed one is gone, so its claims are taken over without waiting
out ``store.grace_s``; nothing finished is evaluated again, and the result is the
uninterrupted search's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import search_config

from evocomp.cli import main
from evocomp.runner import RunLock
from evocomp.search.store import storage_url

SEARCH = {
    "name": "evopress",
    "generations": 16,
    "offspring": 8,
    "stages": [{"tokens": 64, "keep": 2}, {"tokens": 256, "keep": 1}],
}
GRACE_S = 600  # waiting it out would time the test out


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


def search_process(*args: str) -> subprocess.Popen:
    # One thread, as in this process, so the metrics are bit-identical to the solo run's.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = "from evocomp.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, "-q", "search", *args, "--no-eval"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


COMPLETE, RUNNING = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING


def trials(journal: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials as another process sees them now (none before it exists)."""
    if not journal.exists():
        return []
    storage = storage_url(f"journal:{journal}", journal.parent)
    try:
        return optuna.load_study(study_name="tiny", storage=storage).get_trials(deepcopy=False)
    except KeyError:  # the study is not created yet
        return []


def count(ts: list[optuna.trial.FrozenTrial], state: optuna.trial.TrialState) -> int:
    return sum(t.state == state for t in ts)


def stop_mid_search(proc: subprocess.Popen, journal: Path, total: int) -> None:
    """Stop ``proc`` (SIGSTOP) once a fair share of the search is done, at a moment
    when it holds a claim, so that killing it leaves a claim behind."""
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "the search ended before it could be killed"
        time.sleep(0.1)
        if count(trials(journal), COMPLETE) < total // 4:
            continue
        os.kill(proc.pid, signal.SIGSTOP)
        ts = trials(journal)
        if count(ts, RUNNING) and count(ts, COMPLETE) < total:
            return
        os.kill(proc.pid, signal.SIGCONT)
    pytest.fail("the search never held a claim mid-way")


def test_a_killed_search_resumes_at_once_without_evaluating_twice(tmp_path, tiny_model_dir):
    cfg = search_config(tmp_path, tiny_model_dir, search=SEARCH, store={"grace_s": GRACE_S})
    # The uninterrupted search, in this process (which also builds the database and
    # the dense references that the processes below only open).
    assert main(["-q", "search", cfg, "--no-eval", "--set", f"run_dir={tmp_path / 'solo'}"]) == 0
    solo = pd.read_parquet(tmp_path / "solo" / "trials.parquet")
    solo_best = json.loads((tmp_path / "solo" / "best.json").read_text())

    run = tmp_path / "killed"
    journal = run / "trials.journal"
    proc = search_process(cfg, "--set", f"run_dir={run}")
    try:
        stop_mid_search(proc, journal, len(solo))
    finally:
        proc.kill()
        proc.wait()
    before = trials(journal)
    done_before = {t._trial_id for t in before if t.state == COMPLETE}
    left_open = count(before, RUNNING)
    assert 0 < len(done_before) < len(solo) and left_open > 0
    # As if it died mid-append: the journal's lock file stays behind too.
    lock = journal.with_name("trials.journal.lock")
    if not lock.is_symlink():
        os.symlink(journal, lock)
    os.utime(lock, (time.time() - 10,) * 2, follow_symlinks=False)

    started = time.time()
    resumed = search_process("--resume", str(run))
    try:
        out, _ = resumed.communicate(timeout=GRACE_S / 2)
    finally:
        resumed.kill()
    took = time.time() - started
    assert resumed.returncode == 0, out
    assert took < GRACE_S / 4  # nobody waited out the grace period
    log = (run / "search.log").read_text()
    assert f"taking over {left_open} job(s) claimed by worker" in log
    assert "removed" in log and "trials.journal.lock" in log

    # The uninterrupted search's result ...
    best = json.loads((run / "best.json").read_text())
    assert best["genome"] == solo_best["genome"]
    assert best["fitness"] == pytest.approx(solo_best["fitness"], rel=1e-6)
    # ... with every evaluation done once: those finished before the kill are kept,
    # the claims left open were failed and their jobs evaluated by the resume.
    after = trials(journal)
    complete = [t for t in after if t.state == COMPLETE]
    keys = Counter((t.user_attrs["genome"], t.user_attrs["tokens"]) for t in complete)
    assert set(keys.values()) == {1}
    assert set(keys) == set(zip(solo.genome, solo.tokens, strict=True))
    assert done_before <= {t._trial_id for t in complete}
    assert count(after, RUNNING) == 0
    assert count(after, optuna.trial.TrialState.FAIL) >= left_open
    table = pd.read_parquet(run / "trials.parquet")
    assert table.worker.nunique() == 2  # the killed process's results, then the resume's


def test_the_run_lock_is_held_alone_only_when_no_other_process_of_the_run_lives(tmp_path):
    """flock locks belong to open files, so two RunLocks in one process behave as
    two processes would; closing one is what the kernel does for a killed one."""
    run = tmp_path / "run"
    run.mkdir()
    first = RunLock(run).acquire()
    assert first.sole and first.run_id
    # Until the first has judged the old claims and shares, a newcomer waits.
    got: list[RunLock] = []
    newcomer = threading.Thread(target=lambda: got.append(RunLock(run).acquire()))
    newcomer.start()
    time.sleep(0.3)
    assert not got
    first.share()
    newcomer.join(timeout=10)
    (second,) = got
    assert not second.sole and second.run_id == first.run_id
    first.release()
    with RunLock(run) as late:
        assert not late.sole  # the second one still lives
    second.release()
    with RunLock(run) as third:
        assert third.sole and third.run_id == first.run_id
    # A copy of the run directory is another run, whose claims are its own.
    shutil.copytree(run, tmp_path / "copy")
    with RunLock(tmp_path / "copy") as other:
        assert other.sole and other.run_id != first.run_id
