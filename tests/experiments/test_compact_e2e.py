"""A search on a compact database (the variants stored encoded) against the same
search on the dense layout databases were written in before."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import search_config

from evocomp.cli import main
from evocomp.supernet import database


@pytest.mark.parametrize(
    ("compressor", "space"),
    [
        ({"name": "sparsegpt"}, {"name": "sparsity", "target": 0.5, "step": 0.1, "levels": 2}),
        ({"name": "gptq"}, {"name": "bits", "target": 3.0, "bits": [2, 3, 4]}),
    ],
    ids=["sparsity", "bits"],
)
def test_a_search_on_a_compact_database_finds_what_the_dense_layout_finds(
    tmp_path, tiny_model_dir, monkeypatch, compressor, space
):
    """The same search, every trial's fitness equal, whether the variants it
    assembles were stored dense (the layout before encodings) or compact."""
    trials = {}
    for encode in (False, True):
        monkeypatch.setattr(database, "_ENCODE", encode)
        monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
        name = f"encode-{encode}"
        db = tmp_path / f"db-{encode}"
        cfg = search_config(
            tmp_path, tiny_model_dir, name=name, compressor=compressor, space=space,
            database={"path": str(db)},
            search={"name": "evopress", "generations": 3, "offspring": 4,
                    "stages": [{"tokens": 128, "keep": 1}]},
        )
        assert main(["-q", "search", cfg, "--no-eval"]) == 0
        trials[encode] = pd.read_parquet(tmp_path / "runs" / name / "trials.parquet")
        storage = json.loads((db / "manifest.json").read_text()).get("storage", 1)
        assert storage == (database.STORAGE_VERSION if encode else 1)
    dense, compact = trials[False], trials[True]
    assert dense.genome.tolist() == compact.genome.tolist()
    assert dense.fitness.tolist() == compact.fitness.tolist()
