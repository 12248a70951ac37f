"""Per-layer pruners: exact zero counts, N:M structure, quality ordering, determinism."""

from __future__ import annotations

import pydantic
import pytest
import torch
from conftest import correlated_inputs as shared_inputs
from conftest import random_weight

from evocomp.errors import EvocompError
from evocomp.supernet.compressors import (
    COMPRESSORS,
    LayerCompressor,
    Magnitude,
    Pruner,
    SparseGPT,
    Wanda,
    inverse_hessian_cholesky,
)

ROWS, COLS = 24, 72  # 72 columns = blocks of 32, 32, 8 with blocksize 32
NUMEL = ROWS * COLS
NAMES = ["magnitude", "wanda", "sparsegpt"]


def weight(seed: int = 0, rows: int = ROWS, cols: int = COLS) -> torch.Tensor:
    return random_weight(seed, rows, cols)


def correlated_inputs(
    tokens: int = 1024, cols: int = COLS, outliers: int = 4, seed: int = 1
) -> torch.Tensor:
    return shared_inputs(tokens, cols, outliers, seed)


def make(name: str, w: torch.Tensor, x: torch.Tensor | None = None, **params: object) -> Pruner:
    cls = COMPRESSORS.get(name)
    if cls is SparseGPT:
        params.setdefault("blocksize", 32)
    compressor = cls(w, cls.Params(**params))
    assert isinstance(compressor, Pruner)
    if x is not None:
        compressor.add_batch(x)
    return compressor


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x @ w.T - x @ w_hat.float().T).square().sum().item()


def test_registry_holds_the_pruners() -> None:
    assert set(NAMES) <= set(COMPRESSORS.names())
    for name in NAMES:
        cls = COMPRESSORS.get(name)
        assert issubclass(cls, LayerCompressor)
        assert cls.kind == "sparsity"
    assert not Magnitude.needs_calibration
    assert Wanda.needs_calibration and SparseGPT.needs_calibration


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_exact_zero_count_shape_dtype(name: str, dtype: torch.dtype) -> None:
    w = weight().to(dtype)
    original = w.clone()
    pruner = make(name, w, correlated_inputs().to(dtype))
    for level in [0, 1, 5, 863, NUMEL // 2, 1001, NUMEL - 1, NUMEL]:
        out = pruner.compress(level)
        assert out.shape == w.shape and out.dtype == dtype
        assert int((out == 0).sum()) == level
    assert torch.equal(w, original)


@pytest.mark.parametrize("name", NAMES)
def test_level_zero_returns_the_original_as_a_new_tensor(name: str) -> None:
    w = weight()
    out = make(name, w, correlated_inputs()).compress(0)
    assert torch.equal(out, w)
    out.zero_()
    assert not torch.equal(out, w)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("m", [2, 4, 8])
def test_nm_gives_exactly_k_zeros_in_every_group(name: str, m: int) -> None:
    pruner = make(name, weight(), correlated_inputs(), nm_group=m)
    for k in range(m + 1):
        out = pruner.compress(NUMEL * k // m)
        zeros = (out.reshape(ROWS, COLS // m, m) == 0).sum(-1)
        assert torch.all(zeros == k)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_levels_raise(name: str) -> None:
    pruner = make(name, weight(), correlated_inputs(), nm_group=4)
    assert pruner.level_step == NUMEL // 4 == 432
    with pytest.raises(EvocompError, match="multiples of 432"):
        pruner.compress(NUMEL // 2 + 1)
    for level in (-1, NUMEL + 1):
        with pytest.raises(EvocompError, match="outside"):
            pruner.compress(level)


@pytest.mark.parametrize("name", NAMES)
def test_nm_group_must_divide_the_inputs(name: str) -> None:
    params: dict[str, object] = {"nm_group": 5}  # 72 inputs are not groups of 5
    if name == "sparsegpt":
        params["blocksize"] = 40
    pruner = make(name, weight(), correlated_inputs(), **params)
    with pytest.raises(EvocompError, match="does not divide"):
        pruner.compress(0)


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_compress_before_calibration_raises(name: str) -> None:
    with pytest.raises(EvocompError, match="add_batch"):
        make(name, weight()).compress(10)


def test_magnitude_needs_no_calibration_and_prunes_smallest_in_layer() -> None:
    w = weight()
    out = Magnitude(w).compress(100)
    pruned = w[out == 0].abs()
    assert pruned.max() <= w[out != 0].abs().min()


def test_wanda_compares_within_rows() -> None:
    level = 10 * ROWS + 5
    out = make("wanda", weight(), correlated_inputs()).compress(level)
    per_row = (out == 0).sum(1)
    assert per_row[:5].tolist() == [11] * 5 and torch.all(per_row[5:] == 10)


def test_params_are_validated() -> None:
    with pytest.raises(pydantic.ValidationError):
        Magnitude.Params(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError, match="multiple of nm_group"):
        SparseGPT.Params(nm_group=3, blocksize=128)
    with pytest.raises(EvocompError, match="SparseGPT.Params"):
        SparseGPT(weight(), Magnitude.Params())


def test_sparsegpt_beats_wanda_beats_magnitude_on_output_error() -> None:
    w, x = weight(cols=96), correlated_inputs(tokens=2048, cols=96)
    errors = {name: output_error(x, w, make(name, w, x).compress(w.numel() // 2)) for name in NAMES}
    assert errors["sparsegpt"] < 0.5 * errors["wanda"]
    assert errors["wanda"] < 0.5 * errors["magnitude"]
    nm = {
        name: output_error(x, w, make(name, w, x, nm_group=4).compress(w.numel() // 2))
        for name in NAMES
    }
    assert nm["sparsegpt"] < nm["wanda"] < nm["magnitude"]


def test_sparsegpt_handles_dead_inputs() -> None:
    w, x = weight(), correlated_inputs()
    x[:, 10] = 0  # an input that is never active
    pruner = make("sparsegpt", w, x)
    out = pruner.compress(3 * ROWS)  # the first block (32 columns) gets 32 zeros
    # Pruning a dead input costs nothing, so its column goes first in its block.
    assert torch.all(out[:, 10] == 0) and int((out == 0).sum()) == 3 * ROWS
    assert torch.isfinite(pruner.compress(NUMEL // 2)).all()


def test_sparsegpt_works_with_fewer_tokens_than_inputs() -> None:
    pruner = make("sparsegpt", weight(), correlated_inputs(tokens=16))
    out = pruner.compress(NUMEL // 2)
    assert torch.isfinite(out).all() and int((out == 0).sum()) == NUMEL // 2


@pytest.mark.parametrize("name", NAMES)
def test_compress_is_deterministic_and_levels_are_independent(name: str) -> None:
    pruner = make(name, weight(), correlated_inputs())
    first = pruner.compress(NUMEL // 2)
    pruner.compress(NUMEL // 4)
    pruner.compress(NUMEL - 3)
    assert torch.equal(pruner.compress(NUMEL // 2), first)
    assert torch.equal(make(name, weight(), correlated_inputs()).compress(NUMEL // 2), first)


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_batches_accumulate_like_one_batch(name: str) -> None:
    x = correlated_inputs(tokens=1000)
    whole = make(name, weight(), x)
    parts = make(name, weight())
    parts.add_batch(x[:300].reshape(3, 100, COLS))  # any leading dims
    parts.add_batch(x[300:].to(torch.bfloat16).float())
    parts_exact = make(name, weight())
    parts_exact.add_batch(x[:300])
    parts_exact.add_batch(x[300:])
    if isinstance(whole, SparseGPT):
        assert isinstance(parts_exact, SparseGPT)
        torch.testing.assert_close(parts_exact.hessian, whole.hessian, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        parts_exact.compress(NUMEL // 2), whole.compress(NUMEL // 2), rtol=1e-4, atol=1e-4
    )
    assert int((parts.compress(NUMEL // 2) == 0).sum()) == NUMEL // 2


def test_adding_batches_after_compress_updates_the_result() -> None:
    x = correlated_inputs()
    pruner = make("sparsegpt", weight(), x[:16])
    early = pruner.compress(NUMEL // 2)
    pruner.add_batch(x[16:])
    fresh = make("sparsegpt", weight(), x)
    assert not torch.equal(pruner.compress(NUMEL // 2), early)
    torch.testing.assert_close(
        pruner.compress(NUMEL // 2), fresh.compress(NUMEL // 2), rtol=1e-4, atol=1e-4
    )


def test_inverse_hessian_cholesky_retries_with_more_dampening() -> None:
    # Eigenvalues 2.05 and -0.05: dampening 0.01 fails, 0.1 succeeds.
    h = torch.tensor([[1.0, 1.05], [1.05, 1.0]])
    upper, dead = inverse_hessian_cholesky(h, 0.01)
    expected = torch.linalg.inv(h.double() + 0.1 * torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(upper.T.double() @ upper.double(), expected, rtol=1e-5, atol=1e-5)
    assert not dead.any()
    with pytest.raises(EvocompError, match="not positive definite"):
        inverse_hessian_cholesky(-torch.eye(3), 0.01)
