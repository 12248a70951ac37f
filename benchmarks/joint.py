"""Joint sparsity × bitwidth search vs each single space at the same stored bits.

    python benchmarks/joint.py [--generations 16]

Budget: 3.0 stored bits per weight (nonzeros × bits over the searched linears).
Compared at that budget, on held-out text:

* uniform 25% sparsity at 4 bits (the joint space's start) and uniform 3 bits;
* sparsity alone at 4 bits: the joint space with its bits part frozen at 4;
* bits alone: the `bits` config (GPTQ, 2..8 bits, EvoPress) at 3.0 average bits;
* the joint search (SparseGPT then GPTQ per (sparsity, bits) pair).

Every search gets the same generations, offspring and stages.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter

from _common import EVOPRESS, add_overrides, heldout_metrics, timed_search, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--generations", type=int, default=16)
    add_overrides(ap)
    args = ap.parse_args()
    gens = f"search.generations={args.generations}"
    sparsity_part = "{name: sparsity, target: 0.25, step: 0.125, levels: 2}"
    with tempfile.TemporaryDirectory() as tmp:
        joint, joint_result, joint_s = timed_search(
            "joint", [gens, f"run_dir={tmp}/joint", *args.overrides]
        )
        db = str(joint.database.root)  # the frozen-bits search reads a subset of it
        frozen, frozen_result, frozen_s = timed_search(
            "joint",
            [
                gens,
                f"run_dir={tmp}/frozen",
                f"database.path={db}",
                *args.overrides,
                f"space.spaces=[{sparsity_part}, {{name: bits, bits: [4], target: 4}}]",
            ],
            joint.loaded,
        )
        bits, bits_result, bits_s = timed_search(
            "bits",
            [
                EVOPRESS,  # the joint search's optimizer, as the bits config had before
                gens,
                f"run_dir={tmp}/bits",
                "space.target=3.0",
                *args.overrides,
            ],
            joint.loaded,
        )
        assert joint.space.budget == frozen.space.budget
        figures: dict = {"ppl": {}, "kl": {}}
        for exp, genomes in [
            (
                joint,
                {
                    "dense": None,
                    "uniform_25%@4bit": joint.space.uniform(),
                    "searched": joint_result.best,
                },
            ),
            (frozen, {"sparsity_only@4bit": frozen_result.best}),
            (bits, {"uniform_3bit": bits.space.uniform(), "bits_only": bits_result.best}),
        ]:
            part = heldout_metrics(exp, genomes)
            figures["ppl"].update(part["ppl"])
            figures["kl"].update(part["kl"])
        rows = joint.space.describe(joint_result.best)
        mix = Counter(f"{r['sparsity']:.3f}@{r['bits']}" for r in rows)
    write_result(
        "joint",
        {
            **figures,
            "budget": {
                "bits_per_weight": 3.0,
                "searched": round(joint.space.per_weight(joint_result.best), 4),
                "sparsity_only": round(frozen.space.per_weight(frozen_result.best), 4),
                "bits_only": round(bits.space.average_bits(bits_result.best), 4),
            },
            "searched_mix": dict(mix.most_common()),
            "seconds": {
                "joint": round(joint_s, 1),
                "sparsity_only": round(frozen_s, 1),
                "bits_only": round(bits_s, 1),
            },
            "search": {"generations": args.generations, "overrides": args.overrides},
        },
    )


if __name__ == "__main__":
    main()
