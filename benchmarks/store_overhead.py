"""Bookkeeping per evaluation in the trial store: claim, complete and read back,
for each storage backend, with the genome size of SmolLM2's 210 searched layers.

    python benchmarks/store_overhead.py [--jobs 200] [--postgres URL]

No model runs: this is the time the store adds to every candidate (compare with
the candidate's forward pass in candidate_overhead.json). Jobs are claimed as the
runner claims them: batches of 8, two jobs per claim.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from _common import write_result

from evocomp.search.store import Job, TrialStore, storage_url

GENES = 210
BATCH = 8
PER_CLAIM = 2


def per_job_ms(storage, jobs: list[Job]) -> float:
    store = TrialStore(storage, "bench", unit_names=[f"u{i}" for i in range(GENES)], metric="kl")
    started = time.perf_counter()
    with store:
        for k in range(0, len(jobs), BATCH):
            pending = jobs[k : k + BATCH]
            while pending:
                mine, _ = store.claim(pending, limit=PER_CLAIM)
                for claim in mine:
                    store.complete(claim, 0.5, {"kl": 0.5, "ppl": 30.0, "tokens": 512.0}, 1.0)
                pending = [j for j in pending if store.lookup(*j.key) is None]
    return (time.perf_counter() - started) / len(jobs) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--postgres", help="an empty PostgreSQL database URL (postgresql+psycopg://...)")
    args = ap.parse_args()
    rng = random.Random(0)
    genomes = [tuple(rng.randrange(9) for _ in range(GENES)) for _ in range(args.jobs)]
    jobs = [Job(g, 512, cost=1) for g in genomes]
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        figures["sqlite"] = per_job_ms(storage_url("sqlite", Path(tmp)), jobs)
        journal = storage_url(f"journal:{Path(tmp) / 'trials.journal'}", Path(tmp))
        figures["journal"] = per_job_ms(journal, jobs)
        if args.postgres:
            figures["postgresql"] = per_job_ms(args.postgres, jobs)
    for name, ms in figures.items():
        print(f"{name:>11}: {ms:.1f} ms per evaluation", flush=True)
    write_result(
        "store_overhead",
        {"ms_per_evaluation": {k: round(v, 1) for k, v in figures.items()}, "jobs": args.jobs,
         "genes": GENES},
    )


if __name__ == "__main__":
    main()
