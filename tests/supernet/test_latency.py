"""Measured sublayer latency per width: complete, non-decreasing, cached per machine."""

from __future__ import annotations

import pytest
from conftest import tiny_llama

from evocomp.spaces.width import WidthParams, WidthSpace
from evocomp.supernet import latency
from evocomp.supernet.units import find_sublayer_units


@pytest.mark.parametrize("gqa", ["per_group", "whole_groups"])
def test_timings_cover_every_width_rise_with_it_and_are_cached(tmp_path, monkeypatch, gqa):
    model = tiny_llama()
    params = WidthParams(cost="latency", step=0.25, neuron_multiple=32, gqa=gqa)
    needed = WidthSpace.timings_needed(find_sublayer_units(model), params)
    assert len(needed) == 2  # four identical blocks: one attention and one MLP shape
    table = latency.sublayer_timings(
        model, needed, tokens=64, repeats=2, cache=tmp_path, progress=False
    )
    for key, request in needed.items():
        times = [table[key][c] for c in sorted(request.counts)]
        assert set(table[key]) == set(request.counts)
        assert times[0] == 0 and times[-1] > 0  # removed costs nothing
        assert times == sorted(times)

    def no_timing(*_a, **_k):
        raise AssertionError("a cached table was timed again")

    monkeypatch.setattr(latency, "_fastest_ns", no_timing)
    again = latency.sublayer_timings(
        model, needed, tokens=64, repeats=2, cache=tmp_path, progress=False
    )
    assert again == table
