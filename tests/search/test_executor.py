import random
import sys

import pytest
from conftest import search_config
from pydantic import ValidationError

from evocomp.config import load_config
from evocomp.errors import EvocompError
from evocomp.runner import Experiment
from evocomp.search.base import Request
from evocomp.search.executor import EXECUTORS, LocalExecutor, RayExecutor, forwarded_env


@pytest.fixture
def exp(tmp_path, tiny_model_dir, monkeypatch):
    # Ray actors must use this cache too: they inherit EVOCOMP_* or get it forwarded.
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
    exp = Experiment(load_config(search_config(tmp_path, tiny_model_dir)), progress=False)
    _ = exp.database, exp.swapper, exp.evaluator
    return exp


def scores(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics without ``scored_tokens``, which depends on which rows the
    evaluating process had scored for the genome before."""
    return {k: v for k, v in metrics.items() if k != "scored_tokens"}


def jobs_for(exp):
    """Uniform plus a few random feasible genomes, each at several token budgets
    (the tiny config has 4 search sequences of 64 tokens; None means all of them),
    and on another draw of the sequences (a resampling search's)."""
    rng = random.Random(0)
    genomes = [exp.space.uniform(), *(exp.space.random(rng) for _ in range(3))]
    assert len(set(genomes)) == 4
    return [Request(g, t) for g in genomes for t in (64, 192, None)] + [
        Request(g, 64, draw=2) for g in genomes
    ]


def test_registry():
    assert EXECUTORS.names() == ["local", "ray"]
    assert EXECUTORS.get("ray") is RayExecutor
    with pytest.raises(EvocompError, match="'local', 'ray'"):
        EXECUTORS.get("dask")


def test_local_executor_yields_every_job_once(exp):
    jobs = jobs_for(exp)
    with LocalExecutor(exp.evaluation(), LocalExecutor.Params()) as ex:
        assert ex.workers == 1
        results = list(ex.map(jobs))
    assert sorted(i for i, _, _ in results) == list(range(len(jobs)))
    for i, metrics, seconds in results:
        again = exp.evaluate(jobs[i].genome, jobs[i].tokens, draw=jobs[i].draw)[0]
        assert scores(metrics) == scores(again)
        assert again["scored_tokens"] == 0  # every row was scored by the executor
        assert seconds > 0
    # Draw 2 starts with another sequence than the stored order.
    by_job = {(jobs[i].genome, jobs[i].tokens, jobs[i].draw): m for i, m, _ in results}
    assert exp.order(2)[0] != 0
    assert all(by_job[(g, 64, 2)] != by_job[(g, 64, 0)] for g, _, d in by_job if d == 2)
    assert list(ex.map([])) == []


def test_unknown_params_are_rejected_by_name():
    with pytest.raises(ValidationError, match="num_worker"):
        RayExecutor.Params(num_worker=2)
    with pytest.raises(ValidationError, match="num_workers"):
        RayExecutor.Params(num_workers=0)
    with pytest.raises(ValidationError, match="threads"):
        LocalExecutor.Params(threads=2)


def test_ray_executor_errors_before_starting_ray(exp, monkeypatch):
    params = RayExecutor.Params()
    cuda = Experiment(
        exp.cfg.model_copy(update={"model": exp.cfg.model.model_copy(update={"device": "cuda"})})
    )
    with pytest.raises(EvocompError, match="gpus_per_worker"):
        RayExecutor(cuda.evaluation(), params)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(EvocompError, match=r"pip install 'evocomp\[ray\]'"):
        RayExecutor(exp.evaluation(), params)


def test_ray_executor_matches_local(exp):
    """One local Ray start (~5-10 s on 2 cores) covers results, dead workers and close."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    jobs = jobs_for(exp)
    want = {i: m for i, m, _ in LocalExecutor(exp.evaluation(), LocalExecutor.Params()).map(jobs)}
    params = RayExecutor.Params(num_workers=2, cpus_per_worker=1, threads_per_worker=1)
    with RayExecutor(exp.evaluation(), params) as ex:
        assert ex.workers == 2 and ray.is_initialized()
        got = {}
        for i, metrics, seconds in ex.map(jobs):
            assert i not in got
            got[i] = metrics
            assert seconds > 0
        # Bitwise equal: the actors run the same model, database and reference on
        # one torch thread, like this process (conftest), so every float op matches.
        assert {i: scores(m) for i, m in got.items()} == {i: scores(m) for i, m in want.items()}
        counts = ray.get([a.count.remote() for a in ex._actors])
        assert sum(counts) == len(jobs) and min(counts) > 0  # each once, both workers busy

        ray.kill(ex._actors[1])
        with pytest.raises(EvocompError, match="Ray worker 1 of 2 died while evaluating"):
            list(ex.map(jobs))
    assert not ray.is_initialized() and ex._actors == []
    ex.close()  # twice is fine
    with pytest.raises(EvocompError, match="closed"):
        list(ex.map(jobs))


def test_forwarded_env(monkeypatch):
    """What actors get when they do not inherit the driver's environment (a joined
    cluster, or a Ray started before the driver set its variables)."""
    monkeypatch.setenv("EVOCOMP_CACHE", "/somewhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = forwarded_env()
    assert env["EVOCOMP_CACHE"] == "/somewhere" and env["HF_HUB_OFFLINE"] == "1"
    assert "PATH" not in env
