"""Prune-then-quantize: exact zeros where pruned, values on each group's grid,
masked GPTQ, shared calibration work, and validation of the nested specs."""

from __future__ import annotations

import pydantic
import pytest
import torch
from conftest import correlated_inputs as shared_inputs
from conftest import random_weight

from evocomp.config import ComponentSpec, load_config
from evocomp.errors import EvocompError
from evocomp.supernet import compressors, quantizers
from evocomp.supernet.composite import PruneQuantize
from evocomp.supernet.compressors import COMPRESSORS, SparseGPT, inverse_hessian_cholesky
from evocomp.supernet.quantizers import GPTQ, RTN, Quantizer

ROWS, COLS = 48, 192
NUMEL = ROWS * COLS
HALF = NUMEL // 2


def weight(seed: int = 0) -> torch.Tensor:
    return random_weight(seed, ROWS, COLS)


def correlated_inputs(tokens: int = 2048, seed: int = 1) -> torch.Tensor:
    return shared_inputs(tokens, COLS, 4, seed)


def make(
    w: torch.Tensor,
    x: torch.Tensor | None = None,
    prune: str = "sparsegpt",
    quantize: str = "gptq",
    **quantize_options: object,
) -> PruneQuantize:
    prune_spec: dict[str, object] = {"name": prune}
    if prune == "sparsegpt":
        prune_spec["blocksize"] = 32
    quantize_spec: dict[str, object] = {"name": quantize, "group_size": 64, **quantize_options}
    if quantize == "gptq":
        quantize_spec.setdefault("blocksize", 32)
    compressor = PruneQuantize(w, PruneQuantize.Params(prune=prune_spec, quantize=quantize_spec))
    if x is not None:
        compressor.add_batch(x)
    return compressor


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x @ w.T - x @ w_hat.float().T).square().sum().item()


def test_registered_as_a_joint_compressor() -> None:
    assert COMPRESSORS.get("prune-quantize") is PruneQuantize
    assert PruneQuantize.kind == "sparsity+bits"
    assert make(weight(), prune="magnitude", quantize="rtn").needs_calibration is False
    assert make(weight(), prune="magnitude", quantize="gptq").needs_calibration is True
    assert make(weight(), prune="wanda", quantize="rtn").needs_calibration is True


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(
    ("prune", "quantize", "options"),
    [
        ("sparsegpt", "gptq", {}),
        ("sparsegpt", "gptq", {"act_order": True, "symmetric": True, "group_size": 32}),
        ("sparsegpt", "gptq", {"group_size": None}),
        ("wanda", "gptq", {}),
        ("magnitude", "rtn", {"symmetric": True}),
    ],
)
def test_pruned_entries_are_exact_zeros_and_kept_values_on_the_grid(
    prune: str, quantize: str, options: dict[str, object], bits: int
) -> None:
    w, x = weight(), correlated_inputs()
    composite = make(w, x, prune, quantize, **options)
    pruner = composite.pruner
    pruned = pruner.compress(HALF) == 0  # the pruner alone: exactly HALF zeros
    assert int(pruned.sum()) == HALF

    q = composite.quantize((HALF, bits))
    out = composite.compress((HALF, bits))
    assert out.shape == w.shape and out.dtype == w.dtype
    assert torch.equal(out, q.dequantize())
    assert torch.all(out[pruned] == 0)
    # Kept weights may round to the grid's 0 too; more often at fewer bits.
    assert int((out == 0).sum()) >= HALF
    maxq, g = 2**bits - 1, q.group_size
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= maxq
    zero_code = q.zero.repeat_interleave(g, dim=1)
    assert torch.equal(q.codes[pruned].float(), zero_code[pruned])
    steps = out.reshape(ROWS, -1, g) / q.scale[..., None] + q.zero[..., None]
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
    for row_group in out.reshape(-1, g):
        assert row_group.unique().numel() <= 2**bits


def test_at_many_bits_only_the_pruned_entries_are_zero() -> None:
    w, x = weight(), correlated_inputs()
    composite = make(w, x)
    for zeros in [1, HALF, NUMEL - 5]:
        assert int((composite.compress((zeros, 16)) == 0).sum()) == zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_is_kept_and_the_original_untouched(dtype: torch.dtype) -> None:
    w = weight().to(dtype)
    original = w.clone()
    out = make(w, correlated_inputs().to(dtype)).compress((HALF, 3))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert int((out == 0).sum()) >= HALF
    assert torch.equal(w, original)


@pytest.mark.parametrize(
    ("quantize", "options"),
    [("gptq", {}), ("gptq", {"act_order": True}), ("gptq", {"group_size": None}), ("rtn", {})],
)
def test_no_zeros_is_the_quantizer_alone_bit_for_bit(
    quantize: str, options: dict[str, object]
) -> None:
    w, x = weight(), correlated_inputs()
    composite = make(w, x, "sparsegpt", quantize, **options)
    alone = composite.params.quantize_params
    cls = COMPRESSORS.get(quantize)
    reference = cls(w, alone)
    reference.add_batch(x)
    for bits in [2, 3, 4]:
        composite.compress((HALF, bits))  # pruning first must not change what follows
        assert torch.equal(composite.compress((0, bits)), reference.compress(bits))


def test_gptq_beats_rtn_after_sparsegpt() -> None:
    w, x = weight(), correlated_inputs()
    level = (HALF, 3)
    gptq = output_error(x, w, make(w, x, "sparsegpt", "gptq").compress(level))
    rtn = output_error(x, w, make(w, x, "sparsegpt", "rtn").compress(level))
    pruned_only = output_error(x, w, make(w, x).pruner.compress(HALF))
    assert pruned_only < gptq < 0.5 * rtn


def naive_masked_gptq(
    w: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Masked GPTQ as plainly as possible (column order, lazy grids, no blocks): a pruned
    entry is quantized as 0, and its updated value flows on as error."""
    h = 2 * x.T @ x / x.shape[0]
    u, _ = inverse_hessian_cholesky(h, 0.01)
    maxq = 2**bits - 1
    w = w.clone()
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if i % group_size == 0:
            t = (w * keep)[:, i : i + group_size]
            lo, hi = t.amin(1).clamp(max=0), t.amax(1).clamp(min=0)
            scale = (hi - lo) / maxq
            zero = torch.round(-lo / scale)
        target = w[:, i] * keep[:, i]
        q[:, i] = scale * (torch.clamp(torch.round(target / scale) + zero, 0, maxq) - zero)
        w[:, i:] -= torch.outer((w[:, i] - q[:, i]) / u[i, i], u[i, i:])
    return q


@pytest.mark.parametrize("blocksize", [32, 48, 1])
def test_masked_gptq_matches_an_unblocked_reference(blocksize: int) -> None:
    w, x = weight(), correlated_inputs()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.4
    gptq = GPTQ(w, GPTQ.Params(group_size=32, blocksize=blocksize))
    gptq.add_batch(x)
    for bits in [2, 4]:
        out = gptq.quantize_weight(w * keep, bits, keep).dequantize()
        ref = naive_masked_gptq(w * keep, x, keep, bits, 32)
        assert torch.all(out[~keep] == 0)
        assert (out - ref).abs().max() < 1e-4


@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"symmetric": True}])
def test_grids_ignore_whatever_the_mask_drops(options: dict[str, object]) -> None:
    w, x = weight(), correlated_inputs()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.4
    loud = w.masked_fill(~keep, 100.0)  # would dominate any grid it entered
    rtn = RTN(w, RTN.Params(group_size=32, symmetric=bool(options.get("symmetric", False))))
    expected = rtn.quantize_weight(w * keep, 3, keep)
    got = rtn.quantize_weight(loud, 3, keep)
    assert torch.equal(got.codes, expected.codes) and torch.equal(got.scale, expected.scale)
    assert torch.all(got.dequantize()[~keep] == 0)
    gptq = GPTQ(w, GPTQ.Params(group_size=32, blocksize=32, **options))  # type: ignore[arg-type]
    gptq.add_batch(x)
    q = gptq.quantize_weight(loud, 3, keep)
    assert torch.all(q.dequantize()[~keep] == 0)
    # Static grids (act_order) all come from the masked weight; lazy ones at least the
    # first, which no error feedback has reached yet.
    groups = slice(None) if options.get("act_order") else slice(0, 1)
    assert torch.equal(q.scale[:, groups], expected.scale[:, groups])
    assert torch.equal(q.zero[:, groups], expected.zero[:, groups])


@pytest.mark.parametrize("name", ["rtn", "gptq"])
@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"symmetric": True}])
def test_quantize_weight_with_an_all_true_mask_is_plain_quantization(
    name: str, options: dict[str, object]
) -> None:
    w, x = weight(), correlated_inputs()
    if name == "rtn":
        options = {k: v for k, v in options.items() if k != "act_order"}
    cls = COMPRESSORS.get(name)
    quantizer = cls(w, cls.Params(group_size=32, **options))
    assert isinstance(quantizer, Quantizer)
    quantizer.add_batch(x)
    other = weight(seed=5)
    original = other.clone()
    everything = torch.ones_like(w, dtype=torch.bool)
    for bits in [3, 4]:
        plain = quantizer.quantize(bits)
        masked = quantizer.quantize_weight(w, bits, everything)
        assert torch.equal(masked.codes, plain.codes) and torch.equal(masked.scale, plain.scale)
        assert torch.equal(quantizer.quantize_weight(w, bits).codes, plain.codes)
        quantizer.quantize_weight(other, bits, other > 0)
    assert torch.equal(other, original)
    with pytest.raises(ValueError, match="keep must be a bool mask"):
        quantizer.quantize_weight(w, 3, everything.float())
    with pytest.raises(ValueError, match="weight has shape"):
        quantizer.quantize_weight(w[:, :64], 3)


def test_levels_are_independent_of_the_order_they_are_asked_in() -> None:
    w, x = weight(), correlated_inputs()
    levels = [(HALF, 3), (NUMEL // 4, 4), (NUMEL // 4, 2), (0, 3), (NUMEL // 8, 3), (HALF, 2)]
    first = make(w, x)
    outs = [first.compress(level) for level in levels]
    second = make(w, x)
    for level, out in reversed(list(zip(levels, outs, strict=True))):
        assert torch.equal(second.compress(level), out)


def test_hessian_factorisation_and_pruning_are_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(h: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(h.shape)
        return inverse_hessian_cholesky(h, dampening)

    monkeypatch.setattr(compressors, "inverse_hessian_cholesky", counting)
    monkeypatch.setattr(quantizers, "inverse_hessian_cholesky", counting)
    x = correlated_inputs()
    composite = make(weight(), x[:1024])
    assert composite.quantizer.hessian is composite.pruner.hessian  # type: ignore[attr-defined]
    prunings = []
    prune = composite.pruner._prune
    monkeypatch.setattr(composite.pruner, "_prune", lambda z: prunings.append(z) or prune(z))
    for zeros in [0, NUMEL // 4, HALF]:
        for bits in [2, 3, 4]:
            composite.compress((zeros, bits))
    assert len(calls) == 1 and prunings == [NUMEL // 4, HALF]
    composite.add_batch(x[1024:])  # new statistics invalidate the factor and the prunings
    out = composite.compress((HALF, 3))
    assert len(calls) == 2 and prunings == [NUMEL // 4, HALF, HALF]
    torch.testing.assert_close(out, make(weight(), x).compress((HALF, 3)), rtol=0, atol=1e-4)
    assert len(calls) == 3
    # act_order permutes H, so GPTQ then needs a factorisation of its own.
    make(weight(), x, act_order=True).compress((HALF, 3))
    assert len(calls) == 5


def test_calibration_is_required_only_when_a_part_needs_it() -> None:
    w = weight()
    with pytest.raises(EvocompError, match="add_batch"):
        make(w, prune="sparsegpt", quantize="rtn").compress((HALF, 3))
    with pytest.raises(EvocompError, match="add_batch"):
        make(w, prune="magnitude", quantize="gptq").compress((HALF, 3))
    out = make(w, prune="magnitude", quantize="rtn").compress((HALF, 3))
    assert int((out == 0).sum()) >= HALF


@pytest.mark.parametrize(
    ("level", "match"),
    [
        (HALF, "pairs"),
        ((HALF,), "pairs"),
        ((HALF, 3, 1), "pairs"),
        (("a", 3), "pairs"),
        ((1.5, 3), "pairs"),
        ((-1, 3), "outside"),
        ((NUMEL + 1, 3), "outside"),
        ((HALF, 1), "bitwidth"),
        ((HALF, 17), "bitwidth"),
        ((HALF, 3.0), "bitwidth"),
    ],
)
def test_invalid_levels_raise(level: object, match: str) -> None:
    composite = make(weight(), correlated_inputs())
    with pytest.raises(EvocompError, match=match):
        composite.compress(level)  # type: ignore[arg-type]


def test_nm_pruning_is_passed_through() -> None:
    composite = PruneQuantize(
        weight(),
        PruneQuantize.Params(prune={"name": "sparsegpt", "nm_group": 4, "blocksize": 32}),
    )
    composite.add_batch(correlated_inputs())
    out = composite.compress((HALF, 16))
    assert torch.all((out.reshape(-1, 4) == 0).sum(1) == 2)
    with pytest.raises(EvocompError, match="N:4"):
        composite.compress((HALF + 1, 4))


def test_params_default_to_sparsegpt_and_gptq_with_every_option_written_out() -> None:
    params = PruneQuantize.Params()
    dumped = params.model_dump(mode="json")
    assert dumped["prune"] == {"name": "sparsegpt", **SparseGPT.Params().model_dump()}
    assert dumped["quantize"] == {"name": "gptq", **GPTQ.Params().model_dump()}
    assert PruneQuantize.Params.model_validate(dumped) == params
    assert params.quantize_params == GPTQ.Params()
    spelled = ComponentSpec.of(
        COMPRESSORS, {"name": "prune-quantize", "prune": {"name": "sparsegpt", "dampening": 0.01}}
    )
    assert spelled.dump() == ComponentSpec.of(COMPRESSORS, {"name": "prune-quantize"}).dump()
    unnamed = PruneQuantize.Params(prune={"blocksize": 32}, quantize={})
    assert unnamed.prune["name"] == "sparsegpt" and unnamed.quantize == dumped["quantize"]


@pytest.mark.parametrize(
    ("spec", "loc", "match"),
    [
        ({"prune": {"name": "gptq"}}, ("prune", "name"),
         "'magnitude', 'metric', 'sparsegpt', 'wanda'"),
        ({"quantize": {"name": "wanda"}}, ("quantize", "name"), "'gptq', 'rtn'"),
        ({"quantize": {"name": "prune-quantize"}}, ("quantize", "name"), "'gptq', 'rtn'"),
        ({"prune": {"name": "wanda", "dampening": 0.1}}, ("prune", "dampening"), "'nm_group'"),
        ({"prune": {"name": "sparsegpt", "dampning": 0.1}}, ("prune", "dampning"), "'dampening'"),
        ({"quantize": {"name": "gptq", "group_size": 0}}, ("quantize", "group_size"), "greater"),
        ({"prune": {"name": "sparsegpt", "nm_group": 4, "blocksize": 6}}, ("prune",), "multiple"),
        ({"bits": 3}, ("bits",), "Extra inputs"),
    ],
)
def test_params_errors_name_the_field_and_the_allowed_values(
    spec: dict[str, object], loc: tuple[str, ...], match: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=match) as info:
        PruneQuantize.Params(**spec)  # type: ignore[arg-type]
    assert [e["loc"] for e in info.value.errors()] == [loc]


def test_config_errors_name_the_nested_field() -> None:
    with pytest.raises(EvocompError, match=r"prune\.name: unknown pruner 'gptq'; allowed: "
                       r"'magnitude', 'metric', 'sparsegpt', 'wanda'"):
        load_config(None, ["compressor.name=prune-quantize", "compressor.prune.name=gptq"])
    with pytest.raises(EvocompError, match=r"quantize\.bits: unknown option .* 'group_size'"):
        load_config(None, ["compressor.name=prune-quantize", "compressor.quantize.bits=3"])


def test_a_metric_pruner_reading_gradients_gets_them_through_the_composite() -> None:
    params = PruneQuantize.Params(prune={"name": "metric", "expression": "mul(W, G)"},
                                  quantize={"name": "rtn", "group_size": 16})
    assert PruneQuantize.needs_gradients(params)
    assert not PruneQuantize.needs_gradients(PruneQuantize.Params())
    w = random_weight(0, 16, 32)
    g = random_weight(1, 16, 32).abs()
    comp = PruneQuantize(w, params)
    comp.add_gradient(g)
    out = comp.compress((16 * 8, 8))
    kept = out != 0
    assert (~kept).sum(1).min() >= 8  # each row lost its 8 lowest |W|·G at least
    scores = w.abs() * g
    for row, keep in zip(scores, kept, strict=True):
        assert row[~keep].sort().values[7] <= row[keep].min()
