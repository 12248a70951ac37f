"""SparseGPT databases propagate calibration inputs through the start variants."""

import json

import pytest
import torch
from conftest import tiny_spec

from evocomp.spaces import SparsitySpace
from evocomp.supernet.compressors import SparseGPT
from evocomp.supernet.database import (
    build_database,
    open_database,
)
from evocomp.supernet.metric import one_shot
from evocomp.supernet.units import find_linear_units


def _calibration() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _spec(model, params: SparseGPT.Params):
    units = find_linear_units(model)
    space = SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.1, levels=2))
    through = None
    if SparseGPT.needs_start(params):  # as the runner does
        through = {u.name: k for u, k in space.placements(space.uniform())}
    spec = tiny_spec(model, "sparsegpt", params, space.variants(), through=through)
    starts = {u.name: k for u, k in space.placements(space.uniform())}
    return units, spec, starts


def test_level_propagation_is_the_default_and_asks_for_start_variants():
    assert SparseGPT.Params().propagate == "level"
    assert SparseGPT.needs_start(SparseGPT.Params())
    assert not SparseGPT.needs_start(SparseGPT.Params(propagate="dense"))


@pytest.mark.parametrize(("propagate", "order"), [("level", "pruned"), ("dense", "dense")])
def test_uniform_variants_equal_one_shot_sparsegpt_in_that_order(
    tiny_model, tmp_path, propagate, order
):
    params = SparseGPT.Params(propagate=propagate)
    units, spec, starts = _spec(tiny_model, params)
    build_database(tiny_model, units, spec, tmp_path, _calibration(), params=params,
                   progress=False)
    db = open_database(tmp_path, spec)
    direct = one_shot(tiny_model, units, _calibration(), lambda u, w: SparseGPT(w, params),
                      starts, propagate=order)
    for u in units:
        assert torch.equal(db.get(u.name, starts[u.name]), direct[u.name]), u.name


def test_the_two_orders_differ_after_the_first_block(tiny_model, tmp_path):
    stored = {}
    for propagate in ("level", "dense"):
        params = SparseGPT.Params(propagate=propagate)
        units, spec, starts = _spec(tiny_model, params)
        root = tmp_path / propagate
        build_database(tiny_model, units, spec, root, _calibration(), params=params,
                       progress=False)
        db = open_database(root, spec)
        stored[propagate] = {u: db.get(u.name, starts[u.name]) for u in units}
    first = [u for u in units if u.block == 0]
    later = [u for u in units if u.block > 0]
    assert all(torch.equal(stored["level"][u], stored["dense"][u]) for u in first)
    assert not any(torch.equal(stored["level"][u], stored["dense"][u]) for u in later)


def test_a_resumed_build_propagates_the_stored_start_variants(tiny_model, tmp_path):
    params = SparseGPT.Params()
    units, spec, _ = _spec(tiny_model, params)
    build_database(tiny_model, units, spec, tmp_path / "whole", _calibration(), params=params,
                   progress=False)

    def crash_after_block_1(block: int) -> None:
        if block == 1:
            raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_database(tiny_model, units, spec, resumed, _calibration(), params=params,
                       progress=False, on_block=crash_after_block_1)
    assert json.loads((resumed / "manifest.json").read_text())["done_blocks"] == [0, 1]
    build_database(tiny_model, units, spec, resumed, _calibration(), params=params,
                   progress=False)
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())["checksums"]
    again = json.loads((resumed / "manifest.json").read_text())["checksums"]
    assert again == whole  # every block file bit for bit
