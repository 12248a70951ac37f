"""Joint spaces end to end on the tiny model with uneven layer sensitivity."""

import json

import pandas as pd
import pytest
from conftest import exported_model, search_config

from evocomp import runner
from evocomp.cli import main

SPARSITY = {"name": "sparsity", "target": 0.5, "step": 0.1, "levels": 3}
SEARCH = {"generations": 10, "offspring": 6}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))


def _best(tmp_path, name):
    return json.loads((tmp_path / "runs" / name / "best.json").read_text())


def test_depth_times_sparsity_beats_each_single_space_at_equal_cost(tmp_path, uneven_model_dir):
    joint = {"name": "joint", "spaces": [{"name": "depth", "remove": 0}, SPARSITY]}
    runs = {"joint": joint, "sparsity": SPARSITY}
    for name, space in runs.items():
        cfg = search_config(
            tmp_path,
            uneven_model_dir,
            name=name,
            space=space,
            search=SEARCH,
            final_eval={"enabled": False},
        )
        assert main(["-q", "search", cfg]) == 0
    best = _best(tmp_path, "joint")
    assert best["cost"] <= best["budget"] == _best(tmp_path, "sparsity")["budget"]

    # Depth alone at no more than the same kept weights: fewest removals that fit.
    exp = runner.Experiment(runner.load_run_config(tmp_path / "runs" / "joint")[0], progress=False)
    sublayers = [u for u in exp.space.parts[0].units]
    total = sum(a.numel for a in exp.space.atoms)
    linear_of = {
        u.name: sum(a.numel for a in exp.space.atoms if a.name.startswith(u.name + "."))
        for u in sublayers
    }
    removed, kept = 0, total
    for u in sorted(sublayers, key=lambda u: -linear_of[u.name]):
        if kept <= best["budget"]:
            break
        kept -= linear_of[u.name]
        removed += 1
    cfg = search_config(
        tmp_path,
        uneven_model_dir,
        name="depth",
        space={"name": "depth", "remove": removed, "swap": "any"},
        search=SEARCH,
        final_eval={"enabled": False},
    )
    assert main(["-q", "search", cfg]) == 0

    fitness = {name: _best(tmp_path, name)["fitness"] for name in ("joint", "sparsity", "depth")}
    assert fitness["joint"] <= min(fitness["sparsity"], fitness["depth"]), fitness
    rows = best["layers"]
    assert {"removed", "sparsity", "nonzeros", "cost"} <= set(rows[0])


def test_sparsity_times_depth_exports_what_it_scored(tmp_path, uneven_model_dir):
    space = {"name": "joint", "spaces": [{"name": "depth", "remove": 1}, SPARSITY]}
    cfg = search_config(tmp_path, uneven_model_dir, space=space, search={"generations": 3})
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    report = json.loads((run / "eval.json").read_text())
    assert set(report["ppl"]) == {"dense", "drop-last+uniform", "searched"}
    model, layers = exported_model(run, tmp_path / "exported")
    for row in layers:
        w = model.get_submodule(row["unit"]).weight
        zeros = int((w == 0).sum())
        assert zeros == (w.numel() if row["removed"] else w.numel() - row["nonzeros"])
    trials = pd.read_parquet(run / "trials.parquet")
    assert (trials.cost <= json.loads((run / "best.json").read_text())["budget"]).all()


def test_sparsity_times_bits_beats_each_single_space_at_equal_stored_bits(
    tmp_path, uneven_model_dir
):
    """3.0 stored bits per weight: 25% sparsity at 4 bits, or 3 bits dense, or any mix."""
    prune_quantize = {
        "name": "prune-quantize",
        "prune": {"name": "sparsegpt"},
        "quantize": {"name": "gptq", "group_size": 32},
    }
    sparsity = {"name": "sparsity", "target": 0.25, "step": 0.125, "levels": 2}
    runs = {
        "joint": (prune_quantize, [sparsity, {"name": "bits", "bits": [2, 3, 4, 5], "target": 4}]),
        "sparsity": (prune_quantize, [sparsity, {"name": "bits", "bits": [4], "target": 4}]),
    }
    for name, (compressor, parts) in runs.items():
        cfg = search_config(
            tmp_path,
            uneven_model_dir,
            name=name,
            compressor=compressor,
            space={"name": "joint", "spaces": parts},
            search=SEARCH,
            final_eval={"enabled": False},
            database={"path": str(tmp_path / f"db-{name}")},
        )
        assert main(["-q", "search", cfg]) == 0
    cfg = search_config(
        tmp_path,
        uneven_model_dir,
        name="bits",
        compressor={"name": "gptq", "group_size": 32},
        space={"name": "bits", "target": 3.0, "bits": [2, 3, 4, 5]},
        search=SEARCH,
        final_eval={"enabled": False},
        database={"path": str(tmp_path / "db-bits")},
    )
    assert main(["-q", "search", cfg]) == 0
    best = {name: _best(tmp_path, name) for name in ("joint", "sparsity", "bits")}
    numel = sum(r["nonzeros"] / (1 - r["sparsity"]) for r in best["joint"]["layers"])
    assert best["joint"]["budget"] == best["sparsity"]["budget"] == round(3.0 * numel)
    assert best["joint"]["cost"] <= best["joint"]["budget"]
    fitness = {name: b["fitness"] for name, b in best.items()}
    assert fitness["joint"] <= min(fitness["sparsity"], fitness["bits"]), fitness
    layers = best["joint"]["layers"]
    assert {"sparsity", "nonzeros", "bits", "cost"} <= set(layers[0])
    assert len({(r["sparsity"], r["bits"]) for r in layers}) > 2  # a real mix


def test_sparsity_times_bits_exports_what_it_scored(tmp_path, uneven_model_dir):
    compressor = {"name": "prune-quantize", "quantize": {"name": "gptq", "group_size": 32}}
    parts = [
        {"name": "sparsity", "target": 0.25, "step": 0.125, "levels": 2},
        {"name": "bits", "bits": [2, 3, 4], "target": 3},
    ]
    cfg = search_config(
        tmp_path,
        uneven_model_dir,
        compressor=compressor,
        space={"name": "joint", "spaces": parts},
        search={"generations": 2},
    )
    assert main(["-q", "search", cfg]) == 0
    run = tmp_path / "runs" / "tiny"
    model, layers = exported_model(run, tmp_path / "exported")
    for row in layers:
        w = model.get_submodule(row["unit"]).weight
        assert int((w == 0).sum()) >= w.numel() - row["nonzeros"]  # kept weights may round to 0
        for group in w.reshape(w.shape[0], -1, 32).unbind(1):
            assert max(len(r.unique()) for r in group) <= 2 ** row["bits"]  # 0 is a code
