import pytest
import torch
from conftest import tiny_llama, uneven_llama
from pydantic import ValidationError

from evocomp.errors import EvocompError
from evocomp.runner import prepare_optimizer
from evocomp.search import OPTIMIZERS
from evocomp.search.baselines import SLEB, DropLast, ShortGPT
from evocomp.search.evopress import EvoPress
from evocomp.spaces import SparsitySpace
from evocomp.spaces.depth import DepthSpace
from evocomp.supernet.sublayers import skip, sublayer_importance
from evocomp.supernet.units import find_linear_units, find_sublayer_units

# Synthetic damage of removing each of the 8 sublayers of a 4-block model.
DAMAGE = [9.0, 5.0, 0.5, 6.0, 0.1, 7.0, 0.3, 8.0]
TOKENS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))


def _space(layers: int = 4, **kw) -> DepthSpace:
    return DepthSpace(find_sublayer_units(tiny_llama(layers=layers)), DepthSpace.Params(**kw))


def _damage(genome) -> float:
    return sum(d for d, g in zip(DAMAGE, genome, strict=True) if g)


def _drive(opt, fitness) -> list[list]:
    batches = []
    while requests := opt.ask():
        batches.append(requests)
        assert all(opt.space.is_feasible(r.genome) for r in requests)
        opt.tell([fitness(r.genome) for r in requests])
    return batches


def test_registered_with_validated_params():
    assert OPTIMIZERS.get("drop-last") is DropLast
    assert OPTIMIZERS.get("sleb") is SLEB and OPTIMIZERS.get("shortgpt") is ShortGPT
    with pytest.raises(ValidationError):
        SLEB.Params(tokens=0)
    with pytest.raises(ValidationError):
        ShortGPT.Params(tokns=5)


def test_drop_last_asks_once_for_the_uniform_genome():
    space = _space(remove=3)
    opt = DropLast(space, DropLast.Params(tokens=512))
    assert opt.progress == (0, 1)
    batches = _drive(opt, _damage)
    assert [[(r.genome, r.tokens) for r in b] for b in batches] == [[(space.uniform(), 512)]]
    assert opt.best_genome == space.uniform() and opt.best_fitness == _damage(space.uniform())
    assert opt.progress == (1, 1) and opt.ask() == []
    with pytest.raises(RuntimeError):
        opt.tell([0.0])


def test_sleb_removes_greedily_and_ends_exactly_on_budget():
    space = _space(remove=3)
    opt = SLEB(space, SLEB.Params(tokens=256))
    assert opt.progress == (0, 3)
    batches = _drive(opt, _damage)
    # Step k asks for every kept sublayer removed in addition: 8, 7, 6 candidates.
    assert [len(b) for b in batches] == [8, 7, 6]
    for k, batch in enumerate(batches):
        assert all(space.cost(r.genome) == k + 1 and r.tokens == 256 for r in batch)
        assert len({r.genome for r in batch}) == len(batch)
    # The three least damaging sublayers (indices 4, 6, 2), in that order.
    assert batches[1][0].genome[4] == 1 and batches[2][0].genome[6] == 1
    assert opt.best_genome == (0, 0, 1, 0, 1, 0, 1, 0)
    assert opt.best_fitness == pytest.approx(0.9) and space.on_budget(opt.best_genome)
    assert opt.progress == (3, 3)


def test_sleb_respects_blocks_and_quotas():
    space = _space(remove=4, granularity="block")
    batches = _drive(opt := SLEB(space, SLEB.Params()), _damage)
    assert [len(b) for b in batches] == [4, 3]
    assert all(space.is_feasible(r.genome) for b in batches for r in b)
    assert opt.best_genome == (0, 0, 1, 1, 1, 1, 0, 0)  # blocks 1 (6.5) and 2 (7.1)
    quota = _space(remove=3, attn_fraction=1 / 3)  # one attention, two MLP
    opt = SLEB(quota, SLEB.Params())
    _drive(opt, _damage)
    removed = quota.removed(opt.best_genome)
    assert sorted(u.kind for u in removed) == ["attn", "mlp", "mlp"]
    assert opt.best_genome == (0, 1, 0, 1, 1, 0, 0, 0)  # attn 0.1, then mlp 5 and 6


def test_sleb_with_nothing_to_remove_scores_the_dense_model():
    space = _space(remove=0)
    opt = SLEB(space, SLEB.Params(tokens=64))
    batches = _drive(opt, _damage)
    assert [[r.genome for r in b] for b in batches] == [[space.dense()]]
    assert opt.best_genome == space.dense()


def test_sleb_on_a_real_model_removes_the_weakest_blocks():
    model = uneven_llama()  # blocks write into the residual with scales 3, 2, 0.5, 0.2
    params = DepthSpace.Params(remove=4, granularity="block")
    space = DepthSpace(find_sublayer_units(model), params)
    with torch.no_grad():
        dense = model(TOKENS, use_cache=False).logits

    def loss(genome) -> float:
        with torch.no_grad(), skip(model, space.removed(genome)):
            return (model(TOKENS, use_cache=False).logits - dense).pow(2).mean().item()

    opt = SLEB(space, SLEB.Params())
    _drive(opt, loss)
    assert {u.block for u in space.removed(opt.best_genome)} == {2, 3}


def _quiet_block_1():
    """A tiny Llama whose block 1 barely writes into the residual stream."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(0.01)
        model.model.layers[1].mlp.down_proj.weight.mul_(0.01)
    return model


def test_shortgpt_removes_the_least_important_sublayers():
    model = _quiet_block_1()
    space = DepthSpace(find_sublayer_units(model), DepthSpace.Params(remove=2))
    opt = ShortGPT(space, ShortGPT.Params(tokens=128, batch_size=1))
    with pytest.raises(RuntimeError, match="prepare"):
        opt.ask()
    prepare_optimizer(opt, model, TOKENS)
    scores = sublayer_importance(model, TOKENS, space.units)
    assert opt.importance == pytest.approx([scores[u.name] for u in space.units], abs=1e-6)
    batches = _drive(opt, _damage)
    assert [[(r.genome, r.tokens) for r in b] for b in batches] == [
        [((0, 0, 1, 1, 0, 0, 0, 0), 128)]
    ]
    assert opt.best_genome == (0, 0, 1, 1, 0, 0, 0, 0)


def test_shortgpt_blocks_use_block_influence():
    model = uneven_llama()
    params = DepthSpace.Params(remove=2, granularity="block")
    space = DepthSpace(find_sublayer_units(model), params)
    opt = ShortGPT(space, ShortGPT.Params())
    prepare_optimizer(opt, model, TOKENS)
    assert opt.importance is not None and len(opt.importance) == 4
    assert opt.importance.index(min(opt.importance)) == 3
    assert {u.block for u in space.removed(opt.ask()[0].genome)} == {3}


def test_depth_baselines_reject_other_spaces():
    sparsity = SparsitySpace(find_linear_units(tiny_llama()), SparsitySpace.Params())
    for cls in (SLEB, ShortGPT):
        with pytest.raises(EvocompError, match="space.name: depth"):
            cls(sparsity, cls.Params())
    assert DropLast(sparsity, DropLast.Params()).ask()[0].genome == sparsity.uniform()


def test_evopress_can_start_from_the_shortgpt_genome():
    model = _quiet_block_1()
    space = DepthSpace(find_sublayer_units(model), DepthSpace.Params(remove=2))
    params = EvoPress.Params(
        generations=0, start_from=["shortgpt"], stages=[{"tokens": 64, "keep": 1}]
    )
    opt = EvoPress(space, params)
    with pytest.raises(RuntimeError, match="prepare"):
        opt.ask()
    opt = EvoPress(space, params)
    prepare_optimizer(opt, model, TOKENS)
    batches = _drive(opt, _damage)
    shortgpt = (0, 0, 1, 1, 0, 0, 0, 0)
    assert [r.genome for r in batches[0]] == [space.uniform(), shortgpt]
    assert opt.best_genome == shortgpt  # damage 0.5 + 6.0 beats drop-last's 0.3 + 8.0
    with pytest.raises(ValidationError, match="not a one-shot baseline; choose"):
        EvoPress.Params(start_from=["sleb"])
