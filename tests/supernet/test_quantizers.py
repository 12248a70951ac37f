"""Per-layer quantizers: values on each group's grid, quality ordering, act-order,
caching, determinism and validation."""

from __future__ import annotations

import pydantic
import pytest
import torch
from conftest import correlated_inputs as shared_inputs
from conftest import random_weight

from evocomp.errors import EvocompError
from evocomp.supernet import quantizers
from evocomp.supernet.compressors import COMPRESSORS, LayerCompressor, inverse_hessian_cholesky
from evocomp.supernet.quantizers import GPTQ, RTN, QuantizedWeight, Quantizer, quantize_dequantize

ROWS, COLS = 48, 192  # 192 inputs: groups of 32 or 64, blocks of 32 (GPTQ tests)
NAMES = ["rtn", "gptq"]
BITS = [2, 3, 4, 8]
GROUPS = [None, 32, 64]


def weight(seed: int = 0, rows: int = ROWS, cols: int = COLS) -> torch.Tensor:
    return random_weight(seed, rows, cols)


def correlated_inputs(
    tokens: int = 2048, cols: int = COLS, outliers: int = 4, seed: int = 1
) -> torch.Tensor:
    return shared_inputs(tokens, cols, outliers, seed)


def make(name: str, w: torch.Tensor, x: torch.Tensor | None = None, **params: object) -> Quantizer:
    cls = COMPRESSORS.get(name)
    params.setdefault("group_size", 64)
    if cls is GPTQ:
        params.setdefault("blocksize", 32)
    compressor = cls(w, cls.Params(**params))
    assert isinstance(compressor, Quantizer)
    if x is not None:
        compressor.add_batch(x)
    return compressor


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x @ w.T - x @ w_hat.float().T).square().sum().item()


def groups_of(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[rows, n_groups, group_size]`` view of a weight."""
    return w.reshape(w.shape[0], -1, group_size or w.shape[1])


def naive_gptq(
    w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int | None, act_order: bool
) -> torch.Tensor:
    """GPTQ written as plainly as possible: no lazy blocks, no transposes."""
    h = 2 * x.T @ x / x.shape[0]
    maxq = 2**bits - 1

    def grid(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = t.amin(1).clamp(max=0), t.amax(1).clamp(min=0)
        scale = (hi - lo) / maxq
        return scale, torch.round(-lo / scale)

    w = w.clone()
    perm = torch.arange(w.shape[1])
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    g = group_size or w.shape[1]
    static = [grid(w[:, k : k + g]) for k in range(0, w.shape[1], g)]
    w, h = w[:, perm], h[perm][:, perm]
    u, _ = inverse_hessian_cholesky(h, 0.01)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if act_order or group_size is None:
            scale, zero = static[int(perm[i]) // g]
        elif i % g == 0:
            scale, zero = grid(w[:, i : i + g])  # from the updated weights
        q[:, i] = scale * (torch.clamp(torch.round(w[:, i] / scale) + zero, 0, maxq) - zero)
        w[:, i:] -= torch.outer((w[:, i] - q[:, i]) / u[i, i], u[i, i:])
    out = torch.empty_like(q)
    out[:, perm] = q
    return out


def test_registry_holds_the_quantizers() -> None:
    assert set(NAMES) <= set(COMPRESSORS.names())
    for name in NAMES:
        cls = COMPRESSORS.get(name)
        assert issubclass(cls, Quantizer) and issubclass(cls, LayerCompressor)
        assert cls.kind == "bits"
    assert not RTN.needs_calibration and GPTQ.needs_calibration


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", NAMES)
def test_values_lie_on_each_groups_grid(name: str, bits: int, group_size: int | None) -> None:
    quantizer = make(name, weight(), correlated_inputs(), group_size=group_size)
    q = quantizer.quantize(bits)
    maxq = 2**bits - 1
    n_groups = COLS // (group_size or COLS)
    assert q.bits == bits and q.group_size == (group_size or COLS)
    assert q.codes.dtype == torch.int32 and q.codes.shape == (ROWS, COLS)
    assert q.scale.shape == q.zero.shape == (ROWS, n_groups)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= maxq
    assert torch.all(q.scale > 0)
    assert torch.equal(q.zero, q.zero.round()) and torch.all((q.zero >= 0) & (q.zero <= maxq))

    out = quantizer.compress(bits)
    assert torch.equal(out, q.dequantize())
    # (ŵ / scale + zero) is an integer code of the group's grid, within float tolerance.
    steps = groups_of(out, group_size) / q.scale[..., None] + q.zero[..., None]
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)
    assert steps.min() > -1e-3 and steps.max() < maxq + 1e-3
    for row_group in groups_of(out, group_size).reshape(-1, group_size or COLS):
        assert row_group.unique().numel() <= 2**bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_kept_and_original_untouched(name: str, dtype: torch.dtype) -> None:
    w = weight().to(dtype)
    original = w.clone()
    quantizer = make(name, w, correlated_inputs().to(dtype), group_size=32)
    for bits in BITS:
        out = quantizer.compress(bits)
        assert out.shape == w.shape and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert out.data_ptr() != w.data_ptr()
        # Casting to a narrow dtype can merge grid values, never split them.
        for row_group in groups_of(out, 32).flatten(0, 1):
            assert row_group.unique().numel() <= 2**bits
    assert torch.equal(w, original)


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_output_error(bits: int, group_size: int | None) -> None:
    w, x = weight(), correlated_inputs()
    rtn = output_error(x, w, make("rtn", w, group_size=group_size).compress(bits))
    gptq = output_error(x, w, make("gptq", w, x, group_size=group_size).compress(bits))
    assert gptq < 0.5 * rtn


@pytest.mark.parametrize("group_size", [None, 32])
def test_act_order_helps_with_high_variance_inputs(group_size: int | None) -> None:
    w, x = weight(), correlated_inputs(outliers=6)
    for bits in [3, 4]:
        plain = make("gptq", w, x, group_size=group_size).compress(bits)
        ordered = make("gptq", w, x, group_size=group_size, act_order=True).compress(bits)
        # Seeded data; act-order wins ~3x here, so "no worse" leaves a wide margin.
        assert output_error(x, w, ordered) <= output_error(x, w, plain)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_more_bits_give_lower_error(name: str, symmetric: bool) -> None:
    w, x = weight(), correlated_inputs()
    quantizer = make(name, w, x, group_size=64, symmetric=symmetric)
    outs = [quantizer.compress(bits) for bits in BITS]
    out_errors = [output_error(x, w, out) for out in outs]
    weight_errors = [(out - w).norm().item() for out in outs]
    assert out_errors == sorted(out_errors, reverse=True) and len(set(out_errors)) == len(BITS)
    assert weight_errors == sorted(weight_errors, reverse=True)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("group_size", "blocksize"), [(None, 32), (32, 48), (64, 20), (32, 1)])
def test_gptq_matches_an_unblocked_reference(
    group_size: int | None, blocksize: int, act_order: bool
) -> None:
    w, x = weight(), correlated_inputs()
    gptq = make("gptq", w, x, group_size=group_size, blocksize=blocksize, act_order=act_order)
    for bits in [2, 4]:
        out = gptq.compress(bits)
        ref = naive_gptq(w, x, bits, group_size, act_order)
        # Lazy updates reorder float sums; grids may move by an ulp, codes should not.
        assert (out - ref).abs().max() < 1e-4
        assert output_error(x, w, out) == pytest.approx(output_error(x, w, ref), rel=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_compress_is_deterministic_and_levels_are_independent(name: str) -> None:
    extra = {"act_order": True} if name == "gptq" else {}
    quantizer = make(name, weight(), correlated_inputs(), group_size=32, **extra)
    first = quantizer.compress(3)
    quantizer.compress(8)
    quantizer.compress(2)
    assert torch.equal(quantizer.compress(3), first)
    fresh = make(name, weight(), correlated_inputs(), group_size=32, **extra)
    assert torch.equal(fresh.compress(3), first)


def test_gptq_factorises_once_for_many_bitwidths(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(h: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(h.shape)
        return inverse_hessian_cholesky(h, dampening)

    monkeypatch.setattr(quantizers, "inverse_hessian_cholesky", counting)
    x = correlated_inputs()
    gptq = make("gptq", weight(), x[:1024], act_order=True, group_size=32)
    for bits in [2, 3, 4, 5, 6, 8]:
        gptq.compress(bits)
    assert len(calls) == 1
    gptq.add_batch(x[1024:])  # new statistics invalidate the cached factor
    out = gptq.compress(4)
    assert len(calls) == 2
    expected = make("gptq", weight(), x, act_order=True, group_size=32).compress(4)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("level", [0, 1, 17, -3, 3.0, "4", None, True])
@pytest.mark.parametrize("name", NAMES)
def test_invalid_levels_raise(name: str, level: object) -> None:
    quantizer = make(name, weight(), correlated_inputs())
    with pytest.raises(EvocompError, match="bitwidth"):
        quantizer.compress(level)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_group_size_must_divide_the_inputs(name: str) -> None:
    with pytest.raises(EvocompError, match=r"group_size 100 .* valid choices: None .*, 64, 96"):
        make(name, weight(), group_size=100)
    with pytest.raises(EvocompError, match="does not divide the 72 input"):
        COMPRESSORS.get(name)(weight(cols=72))  # the default group of 64 does not fit
    with pytest.raises(pydantic.ValidationError):
        COMPRESSORS.get(name).Params(group_size=0)
    with pytest.raises(EvocompError, match="valid choices"):
        quantize_dequantize(weight(), 4, group_size=50)


def test_params_are_validated() -> None:
    with pytest.raises(pydantic.ValidationError):
        RTN.Params(blocksize=32)  # type: ignore[call-arg]
    for bad in ({"dampening": 0}, {"blocksize": 0}):
        with pytest.raises(pydantic.ValidationError):
            GPTQ.Params(**bad)  # type: ignore[arg-type]
    with pytest.raises(EvocompError, match="GPTQ.Params"):
        GPTQ(weight(), RTN.Params())


def test_gptq_needs_calibration_but_rtn_does_not() -> None:
    with pytest.raises(EvocompError, match="add_batch"):
        make("gptq", weight()).compress(4)
    assert torch.isfinite(make("rtn", weight(), group_size=64).compress(4)).all()


def test_eight_bit_rtn_error_is_tiny() -> None:
    w = weight()
    for group_size in GROUPS:
        out = make("rtn", w, group_size=group_size).compress(8)
        assert (out - w).norm() < 0.01 * w.norm()
    assert (make("rtn", w, group_size=None).compress(16) - w).norm() < 1e-4 * w.norm()


def test_quantize_dequantize_is_rtn() -> None:
    w = weight().to(torch.bfloat16)
    original = w.clone()
    out = quantize_dequantize(w, 3, group_size=64)
    assert out.dtype == torch.bfloat16 and torch.equal(w, original)
    assert torch.equal(out, make("rtn", w, group_size=64).compress(3))
    sym = quantize_dequantize(w.float(), 4, symmetric=True)
    assert torch.equal(sym, make("rtn", w.float(), group_size=None, symmetric=True).compress(4))


@pytest.mark.parametrize("name", NAMES)
def test_symmetric_grid_is_centred(name: str) -> None:
    quantizer = make(name, weight(), correlated_inputs(), group_size=32, symmetric=True)
    q = quantizer.quantize(4)
    assert torch.all(q.zero == 8)
    steps = groups_of(quantizer.compress(4), 32) / q.scale[..., None] + 8
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)


def test_zero_groups_and_dead_inputs_are_exact_and_finite() -> None:
    w, x = weight(), correlated_inputs()
    w[3] = 0  # an all-zero row: every group of it is zero
    x[:, 10] = 0  # an input that is never active
    for name in NAMES:
        for act_order in [False, True] if name == "gptq" else [False]:
            extra = {"act_order": act_order} if name == "gptq" else {}
            out = make(name, w, x, group_size=32, **extra).compress(3)
            assert torch.isfinite(out).all() and torch.all(out[3] == 0)
    few = make("gptq", weight(), correlated_inputs(tokens=16), group_size=32).compress(3)
    assert torch.isfinite(few).all()


def test_quantized_weight_dequantizes_in_any_dtype() -> None:
    q = make("rtn", weight(), group_size=32).quantize(4)
    assert isinstance(q, QuantizedWeight)
    torch.testing.assert_close(q.dequantize(torch.bfloat16), q.dequantize().to(torch.bfloat16))
