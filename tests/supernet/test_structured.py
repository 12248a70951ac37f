"""Structured width pruning: greedy group OBS + least-squares refit, and GQA head layouts."""

from __future__ import annotations

import pytest
import torch
from conftest import correlated_inputs, random_weight

from evocomp.errors import EvocompError
from evocomp.supernet.structured import (
    StructuredOBS,
    StructuredResult,
    gqa_head_levels,
    gqa_kept_heads,
    group_columns,
)

ROWS = 16
HEADS, HEAD_DIM = 6, 8  # an o_proj-like layer: 48 input columns in head blocks
NEURONS = 40  # a down_proj-like layer: one group per input column
LAYERS = {"o_proj": (HEAD_DIM, HEADS * HEAD_DIM), "down_proj": (1, NEURONS)}


def layer(name: str, tokens: int = 512, seed: int = 1) -> tuple[StructuredOBS, torch.Tensor]:
    """A calibrated compressor for ``name`` and its calibration inputs."""
    group_size, cols = LAYERS[name]
    x = correlated_inputs(tokens, cols, seed=seed)
    obs = StructuredOBS(random_weight(0, ROWS, cols), group_size=group_size)
    obs.add_batch(x)
    return obs, x


def output_error(
    x: torch.Tensor, w: torch.Tensor, columns: torch.Tensor, w_k: torch.Tensor
) -> float:
    """``||X Wᵀ − X_k W_kᵀ||²``: the pruned layer against the dense one."""
    return (x @ w.T - x[:, columns] @ w_k.float().T).square().sum().item()


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_level_keeps_exactly_k_groups_nested(name: str) -> None:
    obs, _ = layer(name)
    c, n = obs.group_size, obs.groups
    order = obs.removal_order
    assert sorted(order.tolist()) == list(range(n))
    previous: set[int] = set()
    for k in range(n + 1):
        result = obs.prune(k)
        kept = result.kept.tolist()
        assert len(kept) == k and kept == sorted(set(kept))
        assert result.weight.shape == (ROWS, k * c)
        assert torch.equal(result.columns, group_columns(result.kept, c))
        assert torch.equal(result.removed, order[: n - k])
        # Nested: one greedy order serves every level, so each level adds one group.
        assert previous <= set(kept) and len(set(kept) - previous) == min(k, 1)
        previous = set(kept)
    rank = obs.removal_rank
    assert torch.equal(order[rank], torch.arange(n))


@pytest.mark.parametrize("name", list(LAYERS))
def test_first_removed_group_has_the_lowest_obs_score(name: str) -> None:
    obs, x = layer(name)
    c, n = obs.group_size, obs.groups
    h = 2 * x.double().T @ x.double() / x.shape[0]
    hinv = torch.linalg.inv(h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0]))
    w = obs.weight.double()
    scores = []
    for g in range(n):
        cols = slice(g * c, (g + 1) * c)
        scores.append(torch.trace(w[:, cols] @ torch.linalg.inv(hinv[cols, cols]) @ w[:, cols].T))
    scores_t = torch.stack(scores)
    assert int(obs.removal_order[0]) == int(scores_t.argmin())
    torch.testing.assert_close(obs.removal_losses[0].double(), scores_t.min(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", list(LAYERS))
def test_obs_and_refit_beat_magnitude_group_removal(name: str) -> None:
    obs, x = layer(name)
    c, n = obs.group_size, obs.groups
    w = obs.weight
    norms = w.view(ROWS, n, c).square().sum((0, 2))
    ratios = []
    for k in (n // 4, n // 2, 3 * n // 4):
        result = obs.prune(k)
        kept = norms.argsort(descending=True, stable=True)[:k].sort().values
        mag_cols = group_columns(kept, c)
        mag = output_error(x, w, mag_cols, w[:, mag_cols])
        ours = output_error(x, w, result.columns, result.weight)
        assert ours < mag
        ratios.append(ours / mag)
    print(
        f"{name}: OBS+refit / magnitude output error at keep 25/50/75%:",
        " ".join(f"{r:.2e}" for r in ratios),
    )


@pytest.mark.parametrize("name", list(LAYERS))
def test_refit_is_least_squares_for_its_kept_set(name: str) -> None:
    obs, x = layer(name)
    n, w = obs.groups, obs.weight
    for k in (1, n // 2, n - 1):
        refit, greedy = obs.prune(k), obs.prune(k, refit=False)
        assert torch.equal(refit.kept, greedy.kept)
        ours = output_error(x, w, refit.columns, refit.weight)
        theirs = output_error(x, w, greedy.columns, greedy.weight)
        as_is = output_error(x, w, refit.columns, w[:, refit.columns])
        # With the damped H the greedy's OBS updates reach the refit point too (Schur
        # complement), so they agree up to float32 rounding; keeping the dense weights
        # of the same columns is worse.
        assert ours <= theirs * (1 + 1e-4)
        assert ours < as_is
    # Any kept set, not just the greedy's: the refit still beats the dense weights.
    kept = torch.arange(0, n, 2)
    result = obs.refit(kept.flip(0))
    assert torch.equal(result.kept, kept) and torch.equal(result.removed, torch.arange(1, n, 2))
    ours = output_error(x, w, result.columns, result.weight)
    assert ours < output_error(x, w, result.columns, w[:, result.columns])


def test_damped_refit_generalises_better_than_plain_least_squares() -> None:
    # Few calibration tokens: the undamped fit chases them; the damped one holds up.
    obs, x = layer("o_proj", tokens=64)
    held_out = correlated_inputs(1024, HEADS * HEAD_DIM, seed=7)
    w = obs.weight.double()
    for k in (2, 4):
        result = obs.prune(k)
        cols = result.columns
        h = x.double().T @ x.double()
        plain = (w @ h[:, cols] @ torch.linalg.pinv(h[cols][:, cols])).float()
        assert output_error(x, obs.weight, cols, plain) < output_error(
            x, obs.weight, cols, result.weight
        )
        assert output_error(held_out, obs.weight, cols, result.weight) < output_error(
            held_out, obs.weight, cols, plain
        )


@pytest.mark.parametrize("name", list(LAYERS))
def test_keep_all_is_dense_keep_none_is_empty(name: str) -> None:
    obs, _ = layer(name)
    everything = obs.prune(obs.groups)
    torch.testing.assert_close(everything.weight, obs.weight, rtol=1e-5, atol=1e-5)
    assert everything.removed.numel() == 0
    nothing = obs.prune(0)
    assert nothing.weight.shape == (ROWS, 0) and nothing.kept.numel() == 0
    assert isinstance(nothing, StructuredResult)
    # compress(level): the full-shape weight, removed columns zero, kept ones refit.
    half = obs.prune(obs.groups // 2)
    full = obs.compress(obs.groups - obs.groups // 2)
    assert full.shape == obs.weight.shape
    torch.testing.assert_close(full[:, half.columns], half.weight)
    assert full.count_nonzero() == half.weight.count_nonzero()


def test_dead_inputs_go_first_and_dtype_is_kept() -> None:
    x = correlated_inputs(256, NEURONS)
    x[:, 5] = 0.0
    w = random_weight(0, ROWS, NEURONS).to(torch.bfloat16)
    obs = StructuredOBS(w)
    obs.add_batch(x.to(torch.bfloat16))
    assert int(obs.removal_order[0]) == 5
    assert obs.prune(NEURONS).weight.dtype == torch.bfloat16
    torch.testing.assert_close(obs.prune(NEURONS).weight, w)
    # More data drops the cached order.
    x[:, 5] = 1.0
    obs.add_batch(x)
    assert int(obs.removal_order[0]) != 5


def test_bad_requests_are_refused() -> None:
    with pytest.raises(EvocompError, match="does not divide"):
        StructuredOBS(random_weight(0, 4, 10), group_size=3)
    obs = StructuredOBS(random_weight(0, 4, 8), group_size=2)
    with pytest.raises(EvocompError, match="needs calibration"):
        obs.prune(1)
    obs.add_batch(correlated_inputs(64, 8))
    with pytest.raises(EvocompError, match="cannot keep 5 of 4"):
        obs.prune(5)
    with pytest.raises(EvocompError, match="outside"):
        obs.compress(-1)
    with pytest.raises(EvocompError, match="must lie in"):
        obs.refit(torch.tensor([4]))


@pytest.mark.parametrize(
    ("heads", "kv", "per_group", "whole_groups"),
    [
        (9, 3, [0, 3, 6, 9], [0, 3, 6, 9]),  # SmolLM2-135M
        (8, 8, [0, 8], list(range(9))),  # multi-head: a query head goes with its K/V
        (32, 8, [0, 8, 16, 24, 32], list(range(0, 33, 4))),  # Llama-3-8B
    ],
)
def test_gqa_levels_and_layouts(
    heads: int, kv: int, per_group: list[int], whole_groups: list[int]
) -> None:
    assert gqa_head_levels(heads, kv) == per_group
    assert gqa_head_levels(heads, kv, "whole_groups") == whole_groups
    scores = torch.randn(heads, generator=torch.Generator().manual_seed(heads))
    per = heads // kv
    for layout, levels in (("per_group", per_group), ("whole_groups", whole_groups)):
        for keep in levels:
            kept = gqa_kept_heads(scores, kv, keep, layout)
            assert kept.tolist() == sorted(set(kept.tolist())) and kept.numel() == keep
            counts = torch.bincount(kept // per, minlength=kv)
            if layout == "per_group":  # never splits a KV group unevenly
                assert (counts == keep // kv).all()
                for g in range(kv):  # and keeps each group's best heads
                    mine = scores[g * per : (g + 1) * per]
                    chosen = scores[kept[kept // per == g]]
                    assert (
                        chosen.numel() == 0
                        or chosen.min() >= mine.topk(chosen.numel()).values.min()
                    )
            else:
                assert set(counts.tolist()) <= {0, per}
    with pytest.raises(EvocompError, match="valid counts"):
        gqa_kept_heads(scores, kv, 1 if kv > 1 else heads + 1)
    with pytest.raises(EvocompError, match="do not split"):
        gqa_head_levels(heads, kv + 1 if heads % (kv + 1) else kv + 2)


def test_gqa_heads_from_the_greedy_order_refit() -> None:
    # 6 heads in 2 KV groups: keep 2 per group by the greedy's ranking, then refit.
    obs, x = layer("o_proj")
    heads = gqa_kept_heads(obs.removal_rank, 2, 4)
    assert torch.bincount(heads // 3, minlength=2).tolist() == [2, 2]
    result = obs.refit(heads)
    assert result.weight.shape == (ROWS, 4 * HEAD_DIM)
    assert torch.equal(result.columns, group_columns(heads, HEAD_DIM))
    w = obs.weight
    assert output_error(x, w, result.columns, result.weight) < output_error(
        x, w, result.columns, w[:, result.columns]
    )


# -- physically narrower sublayers (evocomp.supernet.shrink) -------------------------


def _gqa_llama(attn: str) -> torch.nn.Module:
    """A tiny Llama with grouped KV heads: 6 query heads in 2 KV groups of head_dim 8."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).eval()


def _zeroed_columns(linear: torch.nn.Linear, kept: torch.Tensor) -> torch.Tensor:
    w = torch.zeros_like(linear.weight)
    w[:, kept] = linear.weight[:, kept]
    return w


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("heads", [[0, 2, 3, 5], [3, 4, 5], [1, 4]])
def test_a_narrower_attention_computes_what_zeroed_heads_compute(attn, heads):
    """Keeping heads by slicing q/o (and k/v for whole KV groups) gives the logits of
    the full model whose removed heads write nothing (o_proj columns zeroed), and
    the model is bit-identical afterwards."""
    from evocomp.supernet.shrink import heads_kept

    model = _gqa_llama(attn)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    block = model.model.layers[1].self_attn
    kept = torch.tensor(heads)
    columns = group_columns(kept, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        with heads_kept(block, kept):
            assert block.q_proj.weight.shape == (len(heads) * 8, 48)
            narrow = model(tokens).logits
        masked = _zeroed_columns(block.o_proj, columns)
        original = block.o_proj.weight.data
        block.o_proj.weight.data = masked
        want = model(tokens).logits
        block.o_proj.weight.data = original
    torch.testing.assert_close(narrow, want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert block.num_key_value_groups == 3


def test_an_uneven_head_layout_is_refused():
    from evocomp.supernet.shrink import heads_kept

    block = _gqa_llama("eager").model.layers[0].self_attn
    with pytest.raises(EvocompError, match="same number in every group"), heads_kept(
        block, torch.tensor([0, 1, 3])
    ):
        pass
    assert block.q_proj.weight.shape == (48, 48)


def test_a_narrower_mlp_with_a_refit_down_proj_computes_that_refit():
    from evocomp.supernet.shrink import neurons_kept

    model = _gqa_llama("eager")
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    mlp = model.model.layers[0].mlp
    kept = torch.tensor([1, 5, 6, 20, 39])
    refit = torch.randn(48, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with neurons_kept(mlp, kept, down_weight=refit):
            assert mlp.down_proj.weight.shape == (48, 5)
            narrow = model(tokens).logits
        full = torch.zeros_like(mlp.down_proj.weight)
        full[:, kept] = refit
        original = mlp.down_proj.weight.data
        mlp.down_proj.weight.data = full
        want = model(tokens).logits
        mlp.down_proj.weight.data = original
    torch.testing.assert_close(narrow, want, rtol=1e-5, atol=1e-5)
    assert mlp.down_proj.weight.shape == (48, 40)
