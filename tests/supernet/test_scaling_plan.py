"""The scaling plan's formulas (benchmarks/scaling.py): the database size they
predict is what a build writes, and docs/scaling.md holds the tables they print."""

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_spec

from evocomp.spaces import BitsSpace, SparsitySpace
from evocomp.supernet import database
from evocomp.supernet.compressors import COMPRESSORS
from evocomp.supernet.database import build_database
from evocomp.supernet.units import find_linear_units

ROOT = Path(__file__).resolve().parents[2]


def _load_scaling():
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "benchmarks" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


scaling = _load_scaling()
TINY = scaling.Arch("tiny", blocks=4, hidden=64, mlp=128, heads=4, kv_heads=2, vocab=258)


def _payload(root: Path) -> int:
    """Tensor bytes in the block files: each file less its 8-byte length and header."""
    total = 0
    for f in root.glob("block_*.safetensors"):
        with open(f, "rb") as fh:
            (header,) = struct.unpack("<Q", fh.read(8))
        total += f.stat().st_size - 8 - header
    return total


def _layout(root: Path) -> str:
    """compact where the build recorded encodings (the compact format), else dense."""
    manifest = json.loads((root / "manifest.json").read_text())
    return "compact" if any(manifest.get("encodings", {}).values()) else "dense"


def _storage(monkeypatch, encode: bool) -> None:
    """Builds in the compact format or in the dense layout before it (the database's
    switch, where the compact format has one; else dense either way)."""
    monkeypatch.setattr(database, "_ENCODE", encode, raising=False)


def _build(model, space, compressor, params, root):
    spec = tiny_spec(model, compressor, params, space.variants())
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    build_database(model, space.units, spec, root, calib, params=params, progress=False)
    return spec


def test_the_tiny_model_matches_its_architecture(tiny_model):
    units = find_linear_units(tiny_model)
    assert sum(u.numel for u in units) == TINY.searched_weights
    shapes = {u.name.rsplit(".", 1)[-1].removesuffix("_proj"): tuple(u.shape) for u in units}
    assert shapes == TINY.linears()


@pytest.mark.parametrize("encode", [True, False])
def test_predicted_sparsity_database_size_is_what_a_build_writes(
    tiny_model, tmp_path, monkeypatch, encode
):
    _storage(monkeypatch, encode)
    units = find_linear_units(tiny_model)
    space = SparsitySpace(units, SparsitySpace.Params(target=0.5, step=0.1, levels=2))
    params = COMPRESSORS.get("sparsegpt").Params(propagate="dense")
    spec = _build(tiny_model, space, "sparsegpt", params, tmp_path)
    levels = [0.3, 0.4, 0.5, 0.6, 0.7]
    assert len(spec.variants[units[0].name]) == len(levels)
    plan = scaling.Space("tiny", tuple((1 - s, None) for s in levels), "sparsegpt")
    predicted = scaling.database_bytes(TINY, plan, 4, _layout(tmp_path))
    # Zero counts are rounded per unit, so a compact prediction is off by fractions
    # of a value per variant; the dense layout is exact.
    assert _payload(tmp_path) == pytest.approx(predicted, rel=1e-3)


@pytest.mark.parametrize("encode", [True, False])
def test_predicted_bits_database_size_is_what_a_build_writes(
    tiny_model, tmp_path, monkeypatch, encode
):
    _storage(monkeypatch, encode)
    units = find_linear_units(tiny_model)
    bits = [2, 3, 4]
    space = BitsSpace(units, BitsSpace.Params(bits=bits, target=3.0))
    params = COMPRESSORS.get("gptq").Params(group_size=scaling.GROUP)
    _build(tiny_model, space, "gptq", params, tmp_path)
    plan = scaling.Space("tiny", tuple((1.0, b) for b in bits), "gptq")
    predicted = scaling.database_bytes(TINY, plan, 4, _layout(tmp_path))
    assert _payload(tmp_path) == pytest.approx(predicted, rel=1e-3)


def test_compact_bytes_per_weight():
    assert scaling.compact_bytes_per_weight(0.5, None, 2) == 0.5 * 2 + 1 / 8
    assert scaling.compact_bytes_per_weight(1.0, None, 2) == 2  # a mask would not pay
    assert scaling.compact_bytes_per_weight(0.5, 4, 2) == 4 / 8 + 8 / 64  # codes + grid


def test_obs_variant_flops_count_sparsegpts_loops():
    # SparseGPT's loops on a 3 x 8 weight in blocks of 4: per column i of a block a
    # rank-1 update of the block's rows i.. (2·3·(4 − i) FLOPs), per block the lazy
    # update of every later column (2·4·3·(8 − i2)).
    d_out, d_in, b = 3, 8, 4
    exact = sum(2 * d_out * (b - i) for _ in range(d_in // b) for i in range(b))
    exact += sum(2 * b * d_out * (d_in - i2) for i2 in range(b, d_in + 1, b))
    assert scaling.obs_variant_flops(d_out, d_in) == exact


def test_docs_hold_the_tables_the_plan_prints():
    results = json.loads((ROOT / "benchmarks" / "results" / "scaling.json").read_text())
    doc = (ROOT / "docs" / "scaling.md").read_text()
    tables = scaling.plan_markdown(results)
    assert tables.strip() in doc, "regenerate: python benchmarks/scaling.py --plan"
