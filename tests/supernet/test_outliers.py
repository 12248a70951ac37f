"""OWL's outlier ratios against a direct computation on a tiny random model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from evocomp.errors import EvocompError
from evocomp.spaces.units import Unit
from evocomp.supernet.outliers import outlier_ratios
from evocomp.supernet.units import find_linear_units, find_sublayer_units

TOKENS = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))


def _direct(model, spans, factor: float, per_layer: bool) -> list[float]:
    """Every linear's whole input kept, then ``|W| * ||X_j||_2`` and a plain count."""
    inputs: dict[str, list[torch.Tensor]] = {}
    linears = find_linear_units(model)
    handles = [
        model.get_submodule(u.name).register_forward_hook(
            lambda _m, args, _o, name=u.name: inputs.setdefault(name, []).append(args[0])
        )
        for u in linears
    ]
    with torch.no_grad():
        model(TOKENS, use_cache=False)
    for h in handles:
        h.remove()
    out = []
    for span in spans:
        names = {u.name for u in span}
        covered = [u for u in linears if u.name in names or u.name.rsplit(".", 1)[0] in names]
        metrics = []
        for u in covered:
            x = torch.cat(inputs[u.name]).reshape(-1, u.shape[1])
            w = model.get_submodule(u.name).weight
            metrics.append(w.abs() * torch.linalg.vector_norm(x, dim=0))
        if per_layer:
            count = sum(int((m > factor * m.mean()).sum()) for m in metrics)
        else:
            flat = torch.cat([m.flatten() for m in metrics])
            count = int((flat > factor * flat.mean()).sum())
        out.append(count / sum(m.numel() for m in metrics))
    return out


@pytest.mark.parametrize("mean", ["span", "unit"])
def test_outlier_ratios_match_a_direct_computation(mean):
    model = tiny_llama()
    units = find_linear_units(model)
    blocks = [tuple(u for u in units if u.block == b) for b in range(4)]
    got = outlier_ratios(model, TOKENS, blocks, factor=2.0, mean=mean, batch_size=2)
    want = _direct(model, blocks, 2.0, per_layer=mean == "unit")
    assert got == pytest.approx(want, abs=1e-4)  # a weight may sit on the threshold
    assert all(0 < r < 1 for r in got)
    # Batching does not change the statistic.
    one = outlier_ratios(model, TOKENS, blocks, factor=2.0, mean=mean, batch_size=1)
    assert one == pytest.approx(got, abs=1e-4)


def test_sublayer_spans_cover_the_linears_inside():
    model = tiny_llama()
    sublayers = find_sublayer_units(model)
    spans = [(u,) for u in sublayers]
    got = outlier_ratios(model, TOKENS, spans, factor=3.0)
    assert got == pytest.approx(_direct(model, spans, 3.0, per_layer=False), abs=1e-4)
    # OWL's default M = 5 finds fewer outliers than M = 3.
    assert sum(outlier_ratios(model, TOKENS, spans, factor=5.0)) < sum(got)


def test_a_span_without_linears_is_refused():
    model = tiny_llama()
    with pytest.raises(EvocompError, match="no linear layer"):
        outlier_ratios(model, TOKENS, [(Unit("model.norm", "linear", 0, (1, 1)),)])
