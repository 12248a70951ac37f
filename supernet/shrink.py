"""Physically narrower sublayers: keep some attention heads or MLP neurons of a block
by pointing its projections at smaller tensors, so the forward really is cheaper.

Hugging Face's Llama-family attention (Llama, Mistral, Qwen2, Gemma) infers the
number of heads from its projections' output (``view(..., -1, head_dim)``), so a
``q_proj`` with fewer rows computes fewer heads. Two attributes must follow: the
attention's ``num_key_value_groups`` (query heads per KV head, used to repeat K/V
for every attention implementation) and, when whole KV groups go, ``k_proj`` and
``v_proj``. Query head ``h`` reads KV head ``h // num_key_value_groups``, so keeping
the same number of heads in every KV group, in order, keeps that mapping.

Like :func:`evocomp.supernet.sublayers.skip`, each context manager restores every
tensor and attribute on exit, so the model is bit-identical afterwards. The kept
heads and neurons, and refit weights for ``o_proj`` / ``down_proj``, come from
:class:`evocomp.supernet.structured.StructuredOBS`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from evocomp.errors import EvocompError
from evocomp.supernet.structured import group_columns

__all__ = [
    "compact_copy",
    "heads_kept",
    "narrowed",
    "neurons_kept",
    "output_projection",
    "output_weight",
    "widened",
]


def _linear(module: nn.Module, name: str) -> nn.Linear:
    found = getattr(module, name, None)
    if not isinstance(found, nn.Linear):
        raise EvocompError(
            f"{type(module).__name__} has no linear {name!r}; narrowing supports "
            "Llama-style blocks (q/k/v/o_proj attention, gate/up/down_proj MLP)"
        )
    return found


class _Swaps:
    """Tensors and attributes replaced so far, put back in reverse order."""

    def __init__(self) -> None:
        self._tensors: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._attrs: list[tuple[Any, str, Any]] = []

    def tensor(self, param: nn.Parameter, value: torch.Tensor) -> None:
        self._tensors.append((param, param.data))
        param.data = value.to(device=param.device, dtype=param.dtype).contiguous()

    def rows(self, linear: nn.Linear, rows: torch.Tensor) -> None:
        """Keep the output rows ``rows`` of ``linear`` (and its bias)."""
        self.tensor(linear.weight, linear.weight.data[rows])
        if linear.bias is not None:
            self.tensor(linear.bias, linear.bias.data[rows])

    def columns(
        self, linear: nn.Linear, columns: torch.Tensor, weight: torch.Tensor | None
    ) -> None:
        """Keep the input columns ``columns`` of ``linear``; ``weight`` replaces
        them (a refit) when given."""
        kept = linear.weight.data[:, columns] if weight is None else weight
        if kept.shape != (linear.out_features, columns.numel()):
            raise ValueError(
                f"a weight for {columns.numel()} kept columns must be "
                f"[{linear.out_features}, {columns.numel()}], got {list(kept.shape)}"
            )
        self.tensor(linear.weight, kept)

    def attr(self, obj: Any, name: str, value: Any) -> None:
        self._attrs.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def restore(self) -> None:
        for param, data in reversed(self._tensors):
            param.data = data
        for obj, name, value in reversed(self._attrs):
            setattr(obj, name, value)


@contextmanager
def heads_kept(
    attn: nn.Module, heads: torch.Tensor, *, o_weight: torch.Tensor | None = None
) -> Iterator[nn.Module]:
    """While active, ``attn`` computes only the query heads ``heads`` (ascending):
    ``q_proj`` keeps their rows and ``o_proj`` their columns (or ``o_weight``, a
    refit ``[hidden, len(heads) * head_dim]``). With the same number of heads in
    every KV group, K/V stay and ``num_key_value_groups`` shrinks; with whole KV
    groups, ``k_proj`` / ``v_proj`` keep those groups' rows. Other layouts cannot
    be computed by the attention and are refused (see ``gqa_head_levels``)."""
    q, k, v, o = (_linear(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    kept_per, kv_rows, columns = _head_layout(attn, heads.to(torch.long).sort().values)
    swaps = _Swaps()
    try:
        if kv_rows is not None:
            swaps.rows(k, kv_rows)
            swaps.rows(v, kv_rows)
        swaps.rows(q, columns)
        swaps.columns(o, columns, o_weight)
        swaps.attr(attn, "num_key_value_groups", kept_per)
        yield attn
    finally:
        swaps.restore()


def _head_layout(
    attn: nn.Module, heads: torch.Tensor
) -> tuple[int, torch.Tensor | None, torch.Tensor]:
    """How ``attn`` keeps the query heads ``heads`` (ascending): query heads per KV
    group afterwards, the ``k_proj`` / ``v_proj`` rows kept (None: all, every KV group
    stays) and the ``q_proj`` rows (= ``o_proj`` columns) kept."""
    head_dim = int(attn.head_dim)
    per = int(attn.num_key_value_groups)
    n_heads = _linear(attn, "q_proj").out_features // head_dim
    counts = torch.bincount(heads // per, minlength=n_heads // per)
    columns = group_columns(heads, head_dim)
    if bool((counts == counts[0]).all()) and int(counts[0]) > 0:
        return int(counts[0]), None, columns  # every KV group stays, with fewer query heads
    if bool(((counts == 0) | (counts == per)).all()) and int(counts.sum()) > 0:
        # whole KV groups go, their K/V rows with them
        return per, group_columns(torch.nonzero(counts).flatten(), head_dim), columns
    raise EvocompError(
        f"heads {heads.tolist()} keep {counts.tolist()} of {per} query heads per KV "
        "group: keep the same number in every group, or whole groups"
    )


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out].
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None),
                                                            torch.Tensor)


def _mlp_projections(mlp: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """``([projections producing the neurons], projection reading them)``: gate/up and
    down of a Llama-style MLP, c_fc and c_proj of GPT-2's."""
    names = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if all(isinstance(m, nn.Linear) for m in names):
        return names[:2], names[2]
    fc, proj = getattr(mlp, "c_fc", None), getattr(mlp, "c_proj", None)
    if fc is not None and proj is not None and _is_conv1d(fc) and _is_conv1d(proj):
        return [fc], proj
    raise EvocompError(
        f"{type(mlp).__name__} is not a Llama-style (gate/up/down_proj) or GPT-2-style "
        "(c_fc/c_proj) MLP; width search cannot narrow it"
    )


def _output_index(module: nn.Module) -> int:
    """The weight dimension that indexes a projection's outputs."""
    return 1 if _is_conv1d(module) else 0


@contextmanager
def neurons_kept(
    mlp: nn.Module, neurons: torch.Tensor, *, down_weight: torch.Tensor | None = None
) -> Iterator[nn.Module]:
    """While active, a Llama- or GPT-2-style MLP computes only ``neurons`` of its
    intermediate width: ``gate_proj`` / ``up_proj`` (``c_fc``) keep their outputs,
    ``down_proj`` (``c_proj``) its inputs, or ``down_weight``, a refit
    ``[hidden, len(neurons)]`` (``[out, in]`` layout, also for GPT-2)."""
    producers, down = _mlp_projections(mlp)
    neurons = neurons.to(torch.long).sort().values
    swaps = _Swaps()
    try:
        for proj in producers:
            dim = _output_index(proj)
            swaps.tensor(proj.weight, proj.weight.data.index_select(dim, neurons))
            if proj.bias is not None:
                swaps.tensor(proj.bias, proj.bias.data[neurons])
            if _is_conv1d(proj):
                swaps.attr(proj, "nf", neurons.numel())  # Conv1D shapes its output by nf
        if isinstance(down, nn.Linear):
            swaps.columns(down, neurons, down_weight)
        else:
            kept = down.weight.data[neurons] if down_weight is None else down_weight.T
            swaps.tensor(down.weight, kept)
        yield mlp
    finally:
        swaps.restore()


def output_projection(sublayer: nn.Module, kind: str) -> nn.Module:
    """The projection whose inputs are ``sublayer``'s heads or neurons: ``o_proj`` of
    an attention, ``down_proj`` (GPT-2: ``c_proj``) of an MLP (what structured OBS
    prunes and refits)."""
    return _linear(sublayer, "o_proj") if kind == "attn" else _mlp_projections(sublayer)[1]


def output_weight(sublayer: nn.Module, kind: str) -> torch.Tensor:
    """:func:`output_projection`'s weight in ``[out, in]`` layout (a view)."""
    proj = output_projection(sublayer, kind)
    return proj.weight.T if _is_conv1d(proj) else proj.weight


@contextmanager
def _zeroed_groups(
    sublayer: nn.Module, kind: str, kept: torch.Tensor, weight: torch.Tensor
) -> Iterator[nn.Module]:
    """Full-size tensors whose removed heads / neurons are zero and whose kept output
    columns hold ``weight``: what plain ``from_pretrained`` loads and computes alike."""
    if kind == "attn":
        head_dim = int(sublayer.head_dim)
        n_heads = _linear(sublayer, "q_proj").out_features // head_dim
        per = int(sublayer.num_key_value_groups)
        gone_kv = _removed(kept // per, n_heads // per)  # KV groups with no query head left
        outputs = {_linear(sublayer, "q_proj"): group_columns(_removed(kept, n_heads), head_dim)}
        for name in ("k_proj", "v_proj"):
            outputs[_linear(sublayer, name)] = group_columns(gone_kv, head_dim)
        out: nn.Module = _linear(sublayer, "o_proj")
        columns = group_columns(kept, head_dim)
    else:
        producers, out = _mlp_projections(sublayer)
        n = out.weight.shape[1 - _output_index(out)]
        outputs = {proj: _removed(kept, n) for proj in producers}
        columns = kept
    swaps = _Swaps()
    try:
        for proj, gone in outputs.items():
            w = proj.weight.data.clone()
            w.index_fill_(_output_index(proj), gone, 0)
            swaps.tensor(proj.weight, w)
            if proj.bias is not None:
                b = proj.bias.data.clone()
                b[gone] = 0
                swaps.tensor(proj.bias, b)
        full = torch.zeros_like(out.weight.data)
        if _is_conv1d(out):
            full[columns] = weight.T.to(full.dtype)
        else:
            full[:, columns] = weight.to(full.dtype)
        swaps.tensor(out.weight, full)
        yield sublayer
    finally:
        swaps.restore()


def _removed(kept: torch.Tensor, n: int) -> torch.Tensor:
    alive = torch.zeros(n, dtype=torch.bool)
    alive[kept.to(torch.long)] = True
    return (~alive).nonzero().squeeze(1)


@contextmanager
def narrowed(
    sublayer: nn.Module, kind: str, kept: torch.Tensor, weight: torch.Tensor, *, zero: bool = False
) -> Iterator[nn.Module]:
    """While active, ``sublayer`` (``kind`` ``attn`` or ``mlp``) keeps only the heads or
    neurons ``kept`` (at least one), with ``weight`` as its output projection's kept
    columns. Physically narrower by default; with ``zero`` the tensors keep their size
    and the removed rows and columns are zero instead (for export)."""
    if zero:
        manager = _zeroed_groups(sublayer, kind, kept, weight)
    elif kind == "attn":
        manager = heads_kept(sublayer, kept, o_weight=weight)
    else:
        manager = neurons_kept(sublayer, kept, down_weight=weight)
    with manager:
        yield sublayer


def widened(
    sublayer: nn.Module, kind: str, kept: torch.Tensor, narrow: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Full-size values of ``sublayer``'s parameters from values of its form narrowed
    to ``kept`` (see :func:`narrowed`), e.g. trained while narrowed; keys are parameter
    names relative to ``sublayer`` (``q_proj.weight``). Each kept row or column goes
    back where narrowing took it from; the rest is what ``sublayer`` holds now (zeros,
    inside ``narrowed(..., zero=True)``). Parameters narrowing leaves whole pass through."""
    kept = kept.to(torch.long).sort().values
    slices: dict[str, tuple[int, torch.Tensor]] = {}
    if kind == "attn":
        _, kv_rows, columns = _head_layout(sublayer, kept)
        slices.update({"q_proj.weight": (0, columns), "q_proj.bias": (0, columns),
                       "o_proj.weight": (1, columns)})
        if kv_rows is not None:
            for name in ("k_proj", "v_proj"):
                slices.update({f"{name}.weight": (0, kv_rows), f"{name}.bias": (0, kv_rows)})
    else:
        producers, down = _mlp_projections(sublayer)
        names = {id(m): n for n, m in sublayer.named_modules()}
        for proj in producers:
            slices[f"{names[id(proj)]}.weight"] = (_output_index(proj), kept)
            slices[f"{names[id(proj)]}.bias"] = (0, kept)
        slices[f"{names[id(down)]}.weight"] = (1 - _output_index(down), kept)
    params = dict(sublayer.named_parameters())
    out = {}
    for name, value in narrow.items():
        full = params[name].data
        if name in slices and value.shape != full.shape:
            dim, index = slices[name]
            value = full.index_copy(dim, index.to(full.device), value.to(full.dtype))
        out[name] = value
    return out


def compact_copy(model: nn.Module, removed: set[str]) -> nn.Module:
    """A :class:`~evocomp.supernet.compact_llama.CompactLlamaForCausalLM` holding
    ``model``'s weights as they are now: narrowed sublayers (see :func:`narrowed`) at
    their narrow size, the sublayers named in ``removed`` (dotted paths) gone. Only
    for Llama-architecture models (``config.model_type == "llama"``)."""
    from evocomp.supernet.compact_llama import CompactLlamaConfig, CompactLlamaForCausalLM
    from evocomp.supernet.units import find_blocks

    config = model.config
    if config.model_type != "llama":
        raise EvocompError(
            f"--compact supports Llama-architecture models, not {config.model_type!r}; "
            "the default export (removed heads and neurons zeroed) loads anywhere"
        )
    path, blocks = find_blocks(model)
    heads, kv_heads, widths = [], [], []
    for b, block in enumerate(blocks):
        attn, mlp = block.self_attn, block.mlp
        if f"{path}.{b}.self_attn" in removed:
            heads.append(0)
            kv_heads.append(0)
        else:
            # The weights' shapes: narrowing swaps tensors, not out_features.
            heads.append(_linear(attn, "q_proj").weight.shape[0] // int(attn.head_dim))
            kv_heads.append(_linear(attn, "k_proj").weight.shape[0] // int(attn.head_dim))
        gone = f"{path}.{b}.mlp" in removed
        widths.append(0 if gone else _linear(mlp, "gate_proj").weight.shape[0])
    options = {
        k: v for k, v in config.to_dict().items()
        if k not in ("model_type", "architectures", "auto_map", "transformers_version")
    }
    # evocomp's loader turns the KV cache off for scoring; the copy is for generating.
    options["use_cache"] = True
    compact_config = CompactLlamaConfig(
        layer_heads=heads, layer_kv_heads=kv_heads, layer_intermediate=widths, **options
    )
    dtype = next(model.parameters()).dtype
    compact = CompactLlamaForCausalLM(compact_config).to(dtype).eval()
    state = {
        k: v for k, v in model.state_dict().items()
        if not any(k.startswith(name + ".") for name in removed)
    }
    compact.load_state_dict(state, strict=True)
    return compact
