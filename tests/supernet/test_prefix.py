"""Prefix reuse: candidates start their forward at the first block they compress
differently from a cached genome, with exactly the full forward's results."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch
from conftest import _saved, search_config, tiny_llama

from evocomp.cli import main
from evocomp.evaluators.base import forward_logits
from evocomp.evaluators.metrics import KLEvaluator, PerplexityEvaluator
from evocomp.evaluators.reference import compute_reference
from evocomp.spaces import SparsitySpace
from evocomp.supernet.compressors import COMPRESSORS
from evocomp.supernet.database import DatabaseSpec, build_database, open_database
from evocomp.supernet.models import model_fingerprint
from evocomp.supernet.prefix import PrefixCache, block_signature
from evocomp.supernet.swap import Swapper
from evocomp.supernet.units import find_linear_units


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_llama(layers=6)
    units = find_linear_units(model)
    space = SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.1, levels=2))
    params = COMPRESSORS.get("sparsegpt").Params()
    spec = DatabaseSpec(
        model_fingerprint=model_fingerprint(model), compressor="sparsegpt",
        compressor_params=params.model_dump(mode="json"), calibration_fingerprint="c",
        dtype="float32", variants=space.variants(),
    )
    root = tmp_path_factory.mktemp("prefix-db")
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    build_database(model, units, spec, root, calib, params=params, progress=False)
    tokens = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(1))
    reference = compute_reference(model, tokens, batch_size=1, progress=False)
    return model, space, Swapper(model, space, open_database(root, spec)), tokens, reference


def _lineage(space, n: int = 12) -> list[tuple[int, ...]]:
    """Parents and children as an EvoPress search makes them: each a mutation of one
    of the genomes before it (so prefixes are shared at random depths)."""
    rng = random.Random(0)
    out = [space.uniform()]
    while len(out) < n:
        out.append(space.mutate(rng.choice(out), rng, switches=rng.randint(1, 2)))
    return out


@pytest.mark.parametrize("evaluator", ["kl", "ppl"])
def test_scores_equal_the_full_forward_bit_for_bit(setup, evaluator):
    model, space, swapper, tokens, reference = setup
    ev = (KLEvaluator(tokens, reference, batch_size=1) if evaluator == "kl"
          else PerplexityEvaluator(tokens, batch_size=1))
    cache = PrefixCache(model, forward_logits, max_bytes=2**30)
    for k, genome in enumerate(_lineage(space)):
        budget = 48 if k % 3 else None  # one row, or all three
        # Draws of a resampling search: rows in other orders, states cached per row.
        order = [[0, 1, 2], [2, 0, 1], [1, 2, 0]][k % 3]
        signature = block_signature(cache.n_blocks, space.placements(genome))
        with swapper.apply(genome) as m:
            full = ev.evaluate(m, budget, order=order)
            reused = ev.evaluate(m, budget, forward=cache.forward(signature), order=order)
        assert reused == full
    # Later genomes shared prefixes with earlier ones, so some blocks were not run.
    assert cache.blocks_run < cache.blocks_total


def test_a_repeated_genome_runs_no_block_and_batches_match_rows(setup):
    model, space, swapper, tokens, _ = setup
    cache = PrefixCache(model, forward_logits, max_bytes=2**30)
    genome = _lineage(space)[3]
    signature = block_signature(cache.n_blocks, space.placements(genome))
    with swapper.apply(genome), torch.inference_mode():
        first = cache.forward(signature)(tokens, range(len(tokens)))
        run = cache.blocks_run
        again = cache.forward(signature)(tokens, range(len(tokens)))
        assert cache.blocks_run == run  # every row started after the last block
        assert torch.equal(first, again)
        rows = torch.cat([forward_logits(model, tokens[i : i + 1]) for i in range(3)])
        assert torch.equal(first, rows)


def test_memory_stays_within_the_budget_and_results_stay_exact(setup):
    model, space, swapper, tokens, reference = setup
    ev = KLEvaluator(tokens, reference, batch_size=1)
    one_row = 7 * 48 * model.config.hidden_size * 4  # 6 block inputs + the last output
    cache = PrefixCache(model, forward_logits, max_bytes=2 * one_row)
    for genome in _lineage(space):
        signature = block_signature(cache.n_blocks, space.placements(genome))
        with swapper.apply(genome) as m:
            assert ev.evaluate(m, 96, forward=cache.forward(signature)) == ev.evaluate(m, 96)
        assert cache.bytes <= 2 * one_row
    cache.clear()
    assert cache.bytes == 0


def test_a_search_gives_the_same_trials_with_and_without_prefix_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
    model_dir = _saved(tiny_llama(layers=6), tmp_path / "tiny")
    out = {}
    for name, gb in (("plain", 0), ("prefix", 0.5)):
        cfg = search_config(tmp_path, model_dir, name=name, database={
            "path": str(tmp_path / "db"), "prefix_gb": gb,
        }, evaluator={"name": "kl", "batch_size": 1}, final_eval={"enabled": False})
        assert main(["-q", "search", cfg]) == 0
        run = tmp_path / "runs" / name
        trials = pd.read_parquet(run / "trials.parquet")
        out[name] = (json.loads((run / "best.json").read_text())["genome"],
                     sorted(zip(trials["genome"].map(tuple), trials["tokens"],
                                trials["fitness"], strict=True)))
    assert out["prefix"] == out["plain"]
