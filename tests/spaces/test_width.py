"""The width space (groundwork for issue #12): GQA-correct levels, exact costs and
budgets, on units discovered from a real (tiny) grouped-query-attention Llama."""

from __future__ import annotations

import random

import pytest
from conftest import tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from evocomp.errors import EvocompError
from evocomp.spaces.width import WidthParams, WidthSpace
from evocomp.supernet.units import find_linear_units, find_sublayer_units


def _gqa_units():
    """6 query heads in 2 KV groups of head_dim 8, hidden 48, 40 MLP neurons."""
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8,
    )
    return find_sublayer_units(LlamaForCausalLM(cfg))


def _space(**kw):
    # 6 heads: a step under 1/6 would be finer than one head.
    return WidthSpace(_gqa_units(), WidthParams(**{"neuron_multiple": 8, "step": 0.17, **kw}))


def test_discovery_records_each_sublayers_width():
    attn, mlp = _gqa_units()[:2]
    assert (attn.groups, attn.kv_groups, attn.group_numel) == (6, 2, 8 * (48 + 48))
    assert attn.numel == 6 * attn.group_numel + 2 * 2 * 8 * 48  # plus k_proj and v_proj
    assert (mlp.groups, mlp.kv_groups, mlp.group_numel) == (40, 0, 3 * 48)
    assert mlp.numel == 40 * mlp.group_numel


@pytest.mark.parametrize("gqa, counts", [("per_group", {0, 2, 4, 6}), ("whole_groups", {0, 3, 6})])
def test_attention_levels_keep_layouts_the_attention_can_compute(gqa, counts):
    space = _space(gqa=gqa, levels=8, target=0.6)
    kept = {space.kept(0, lv) for lv in range(space.n_levels(0))}
    assert kept == counts
    mlp = {space.kept(1, lv) for lv in range(space.n_levels(1))}
    assert all(k % 8 == 0 or k == 40 for k in mlp) and 40 in mlp


def test_costs_count_the_parameters_kept():
    space = _space(gqa="whole_groups")
    attn = space.units[0]
    for lv in range(space.n_levels(0)):
        kept = space.kept(0, lv)
        kv_left = kept // 3  # whole groups of 3 query heads
        assert space.level_cost(0, lv) == kept * attn.group_numel + kv_left * 2 * 8 * 48
    mlp = space.units[1]
    assert space.level_cost(1, space.n_levels(1) - 1) == mlp.numel


def test_the_budget_is_exact_under_thousands_of_mutations_and_repairs():
    space = _space(target=0.6, trade=0.0)  # exact switches only
    start = space.uniform()
    assert space.cost(start) == space.budget
    # Nearest to 60% of the parameters: 2 heads per pair of KV groups keep 50% of the
    # attention (K/V stay), 4 heads 75%; 24 of 40 neurons keep 60% of the MLP.
    assert [space.kept(i, g) for i, g in enumerate(start)][:2] == [2, 24]
    rng, genome = random.Random(0), start
    moved = set()
    for _ in range(2000):
        genome = space.mutate(genome, rng, switches=rng.randint(1, 3))
        assert space.cost(genome) == space.budget
        moved.add(genome)
    assert len(moved) > 20
    # Trades reach removals too: never over the budget, within one level step of it.
    space = _space(target=0.6)
    step = max(
        abs(space.level_cost(i, lv + 1) - space.level_cost(i, lv))
        for i in range(len(space)) for lv in range(space.n_levels(i) - 1)
    )
    genome, seen = space.uniform(), set()
    for _ in range(2000):
        genome = space.mutate(genome, rng, switches=rng.randint(1, 3))
        assert space.budget - step < space.cost(genome) <= space.budget
        seen.update(space.kept(i, g) for i, g in enumerate(genome) if space.units[i].kind == "attn")
    assert 0 in seen
    for _ in range(200):
        wild = tuple(rng.randrange(space.n_levels(i)) for i in range(len(space)))
        fixed = space.repair(wild, rng)
        assert space.is_feasible(fixed)


def test_units_without_width_are_refused():
    with pytest.raises(EvocompError, match="space.name=width needs"):
        WidthSpace(find_linear_units(tiny_llama()), WidthParams())
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
    units = find_sublayer_units(gpt2)  # GPT-2's fused c_attn has no head width; its MLP has
    assert [u.groups for u in units] == [0, 128, 0, 128]
    with pytest.raises(EvocompError, match="transformer.h.0.attn"):
        WidthSpace(units, WidthParams())
    mlps = [u for u in units if u.kind == "mlp"]  # units.targets: [mlp]
    assert WidthSpace(mlps, WidthParams()).kept(0, 0) == 0


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"step": 0.1}, "space.step=0.1 is finer than one query head"),
        ({"neuron_multiple": 48}, "space.neuron_multiple=48 exceeds the 40 neurons"),
        ({"target": 0.1, "gqa": "whole_groups", "neuron_multiple": 40},
         "space.target=0.1 cannot be reached"),
    ],
)
def test_grids_no_sublayer_can_compute_are_refused_naming_the_field(kw, field):
    with pytest.raises(EvocompError, match=field.replace(".", r"\.")):
        _space(**kw)


def _timed(**kw):
    """A latency-cost space from a made-up timing table (no model needed)."""
    units = _gqa_units()
    params = WidthParams(**{"neuron_multiple": 8, "step": 0.17, "cost": "latency", **kw})
    needed = WidthSpace.timings_needed(units, params)
    assert {r.unit.kind for r in needed.values()} == {"attn", "mlp"}  # one per shape
    # Attention time grows with heads from a fixed part (K/V); MLPs linearly.
    table = {
        key: {c: (0 if c == 0 else 1000 + 500 * c) if r.unit.kind == "attn" else 40 * c
              for c in r.counts}
        for key, r in needed.items()
    }
    return WidthSpace(units, WidthSpace.with_timings(params, table)), table


def test_a_latency_cost_counts_measured_time_and_keeps_budgets_exact():
    space, table = _timed(target=0.6)
    assert WidthSpace.timings_needed(space.units, space.params) == {}  # already measured
    attn_key = next(k for k in table if k.startswith("attn/"))
    for lv in range(space.n_levels(0)):
        assert space.level_cost(0, lv) == table[attn_key][space.kept(0, lv)]
    assert space.cost(space.uniform()) == space.budget
    dense = sum(max(t.values()) for t in table.values() for _ in range(3))
    assert space.kept_share(space.uniform()) == pytest.approx(space.budget / dense)
    assert "latency_ms" in space.describe(space.uniform())[0]
    rng, genome = random.Random(0), space.uniform()
    for _ in range(500):
        genome = space.mutate(genome, rng)
        assert space.is_feasible(genome)


def test_a_latency_table_missing_a_width_is_refused():
    space, table = _timed(target=0.6)
    key = next(iter(table))
    del table[key][max(table[key])]
    params = space.params.model_copy(update={"latency": table})
    with pytest.raises(EvocompError, match="space.latency has no time for"):
        WidthSpace(space.units, params)
