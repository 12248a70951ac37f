"""Recovery fine-tuning of a compressed model, in place, keeping its structure.

A candidate is applied to the model in place (see :class:`~evocomp.supernet.swap.Swapper`),
and :func:`training` trains that very model on a ``[sequences, seq_len]`` token
tensor, by knowledge distillation from a teacher (KL(teacher ‖ student) on the
next-token logits), optionally plus the language-modelling loss. What the
compression decided stays decided:

* exact zeros of a weight matrix (pruned entries, and zeroed heads or neurons) stay
  exactly zero: their gradients are masked and the optimizer's step is masked again
  afterwards, since AdamW's moments and weight decay would move them otherwise;
* removed sublayers stay removed: the model skips their forward, so they get no
  gradient, and their parameters (named in ``removed``) are neither trained nor
  adapted nor reported as trained;
* narrowed sublayers stay narrow: their projections are physically smaller tensors,
  and training updates those;
* quantized weights (named in ``frozen``) keep their grid: ``full`` training leaves
  them as they are (there is no straight-through re-quantization), ``lora`` trains
  low-rank adapters over them, whose merged result (:meth:`Trainer.weights`) is no
  longer on the grid.

``full`` trains every other parameter with AdamW; ``lora`` injects peft LoRA
adapters into the blocks' linear layers over frozen weights. Everything training
changes is undone when :func:`training` exits: the weights are restored bit for bit
(training works on one private copy of each trainable tensor, never on the tensors
the swapper pointed the model at), adapters are removed and ``requires_grad`` flags
put back. So a caller can train a candidate, score it, and move on to the next one
without any other copy of the model (training-aware selection), or keep the result
first with :meth:`Trainer.weights` and put it back later with :func:`loaded_weights`
(recovery fine-tuning).

Determinism: the order of the training sequences is a function of the seed and the
step, and the model runs in eval mode (no dropout), so :meth:`Trainer.state_dict`
(step, trainable tensors, optimizer and schedule) is all a resumed run needs to
continue bit for bit like an uninterrupted one (on CPU, with the same thread count).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from evocomp.errors import EvocompError
from evocomp.registry import StrictModel
from evocomp.supernet.units import find_linear_units

__all__ = [
    "DEFAULT_LR",
    "TrainParams",
    "TrainResult",
    "Trainer",
    "distillation_loss",
    "language_model_loss",
    "loaded_weights",
    "max_lora_rank",
    "training",
]

Method = Literal["full", "lora"]

DEFAULT_LR: dict[str, float] = {"full": 1e-4, "lora": 1e-3}
"""AdamW's peak learning rate when none is given, sized for small models such as
SmolLM2-135M: on the quickstart's 50% sparse model, 4 steps of 2 x 512 tokens took
the held-out perplexity from 46.3 to 40.4 at 1e-4 (full) and to 40.6 at 1e-3 (LoRA,
rank 16), but only to 45.1 at DarwinLM's 1e-5 (tuned for 7B models; give it with
``lr`` for large ones)."""

_ADAPTER = "default"  # peft's adapter name; one adapter at a time


class TrainParams(StrictModel):
    """How to fine-tune a compressed model (see :func:`training`)."""

    tokens: int = Field(200_000, ge=1, description="training tokens, in whole sequences "
                        "(the data is cycled when it holds fewer)")
    method: Method = Field("full", description="'full': AdamW on every unfrozen parameter; "
                           "'lora': peft LoRA adapters on the blocks' linear layers")
    lr: float | None = Field(None, gt=0, le=1, description="AdamW peak learning rate "
                             "(default: 1e-4 for full, 1e-3 for lora)")
    batch_size: int = Field(4, ge=1, description="sequences per optimizer step")
    warmup: float = Field(0.05, ge=0, lt=1, description="share of the steps with a linear "
                          "warm-up; then the rate decays to zero on a cosine")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm "
                                        "to this (None: no clipping)")
    kd_weight: float = Field(1.0, ge=0, description="weight of KL(teacher || student) on "
                             "the next-token logits (needs a teacher)")
    lm_weight: float = Field(0.0, ge=0, description="weight of the next-token "
                             "cross-entropy on the training text")
    temperature: float = Field(1.0, gt=0, description="distillation temperature (the KL "
                               "is scaled by its square)")
    lora_rank: int = Field(16, ge=1, description="LoRA rank r")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha (adapters scale by alpha/r)")
    seed: int = Field(0, description="seeds the order of the sequences and LoRA's init")

    @model_validator(mode="after")
    def _some_loss(self) -> TrainParams:
        if self.kd_weight == 0 and self.lm_weight == 0:
            raise ValueError("kd_weight and lm_weight are both 0: nothing to train on")
        return self

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


@dataclass(frozen=True)
class TrainResult:
    """What :meth:`Trainer.run` did, over every run of the same training."""

    steps: int
    tokens: int
    """Tokens trained on (whole sequences)."""
    losses: list[float]
    """The loss of every step so far."""
    seconds: float
    """Wall seconds of this run of :meth:`Trainer.run` alone."""


# -- losses (pure maths) ---------------------------------------------------------------


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) between the softmaxes of the
    logits (``[..., vocab]``) at ``temperature``, times ``temperature²`` so gradients
    keep their scale (Hinton et al.)."""
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def language_model_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` ``[batch, seq, vocab]`` on ``tokens``."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    )


def _lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` share of ``steps``, then a cosine to 0."""
    ramp = math.ceil(warmup * steps)
    if step < ramp:
        return (step + 1) / ramp
    done = (step - ramp) / max(1, steps - ramp)
    return 0.5 * (1 + math.cos(math.pi * done))


# -- the model's trainable pieces ------------------------------------------------------


def _under(name: str, prefixes: Collection[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _lora_targets(model: nn.Module, removed: Collection[str]) -> list[tuple[str, nn.Module]]:
    """The blocks' linear layers that LoRA adapts: all but those of removed sublayers."""
    units = find_linear_units(model)
    return [(u.name, model.get_submodule(u.name)) for u in units if not _under(u.name, removed)]


def max_lora_rank(model: nn.Module, removed: Collection[str] = ()) -> int:
    """The largest LoRA rank every adapted linear layer of ``model`` (as it is now,
    narrowed layers at their narrow size) can take: its smallest weight dimension."""
    targets = _lora_targets(model, removed)
    if not targets:
        raise EvocompError("the model has no linear layer left to adapt with LoRA")
    return min(min(m.weight.shape) for _, m in targets)


@contextmanager
def loaded_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """While active, each parameter named in ``weights`` (as ``named_parameters``
    names it) holds that tensor, e.g. what :meth:`Trainer.weights` returned; on exit
    each points at its previous tensor again, bit for bit."""
    params = dict(model.named_parameters())
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for name, value in weights.items():
            param = params.get(name)
            if param is None:
                raise EvocompError(f"the model has no parameter {name!r} to load")
            if value.shape != param.shape:
                raise EvocompError(
                    f"parameter {name!r} is {list(param.shape)} but the weights hold "
                    f"{list(value.shape)}: they were trained on another candidate"
                )
            saved.append((param, param.data))
            param.data = value.to(device=param.device, dtype=param.dtype)
        yield model
    finally:
        for param, data in reversed(saved):
            param.data = data


def _sequences(n: int, params: TrainParams, seq_len: int) -> int:
    sequences = params.tokens // seq_len
    if sequences == 0:
        raise EvocompError(
            f"tokens={params.tokens} is less than one training sequence of {seq_len} tokens"
        )
    if n == 0:
        raise EvocompError("training needs at least one sequence of tokens")
    return sequences


def _order(n: int, seed: int, epoch: int) -> list[int]:
    """The rows of a data tensor of ``n`` sequences in epoch ``epoch``'s order."""
    rows = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(rows)
    return rows


# -- the trainer -----------------------------------------------------------------------


class Trainer:
    """Trains a model in place; made by :func:`training`, valid inside it.

    ``steps`` optimizer steps of ``batch_size`` sequences cover ``params.tokens``
    tokens (rounded down to whole sequences; the data is cycled, reshuffled per pass).
    """

    def __init__(
        self,
        model: nn.Module,
        data: torch.Tensor,
        params: TrainParams,
        trainable: dict[str, nn.Parameter],
        *,
        teacher: nn.Module | None,
        lora: Any,
        progress: bool,
    ) -> None:
        self.model = model
        self.data = data
        self.params = params
        self.teacher = teacher
        self.progress = progress
        self.sequences = _sequences(data.shape[0], params, data.shape[1])
        self.steps = math.ceil(self.sequences / params.batch_size)
        self.step = 0
        self.losses: list[float] = []
        self._device = next(model.parameters()).device
        self._lora = lora  # peft's LoraModel (lora), or None (full)
        self._trainable = trainable
        if not trainable:
            raise EvocompError("nothing to train: every parameter is frozen or removed")
        self._masks = {  # parameter name -> where it is exactly 0
            name: zeros
            for name, p in self._structured().items()
            if bool((zeros := p.data == 0).any())
        }
        self.optimizer = torch.optim.AdamW(
            list(trainable.values()), lr=params.peak_lr, weight_decay=params.weight_decay
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(step, self.steps, params.warmup)
        )

    def _structured(self) -> dict[str, torch.Tensor]:
        """The weight matrices whose exact zeros must stay zero: the trained ones
        (full), or the adapted ones, where merging would fill them (lora)."""
        if self._lora is None:
            return {n: p for n, p in self._trainable.items() if p.ndim >= 2}
        return {f"{name}.weight": layer.get_base_layer().weight for name, layer in self._layers()}

    def _layers(self) -> list[tuple[str, nn.Module]]:
        """The LoRA layers (``name`` is the adapted module's name without adapters)."""
        from peft.tuners.lora import LoraLayer

        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    # -- training ------------------------------------------------------------------
    def _rows(self, step: int) -> list[int]:
        n = self.data.shape[0]
        start = step * self.params.batch_size
        stop = min(start + self.params.batch_size, self.sequences)
        return [_order(n, self.params.seed, k // n)[k % n] for k in range(start, stop)]

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        p = self.params
        logits = self.model(batch, use_cache=False).logits
        loss = torch.zeros((), device=logits.device)
        if p.kd_weight:
            assert self.teacher is not None  # training() checks
            with torch.no_grad():
                target = self.teacher(batch, use_cache=False).logits
            loss = loss + p.kd_weight * distillation_loss(logits, target, p.temperature)
        if p.lm_weight:
            loss = loss + p.lm_weight * language_model_loss(logits, batch)
        return loss

    def train_step(self) -> float:
        """One optimizer step on the next batch; returns its loss."""
        batch = self.data[self._rows(self.step)].to(self._device)
        with torch.enable_grad():
            loss = self._loss(batch)
            loss.backward()
        # LoRA's base weights are frozen: their zeros need masking only when merged.
        masked = {} if self._lora is not None else self._trainable
        for name, zeros in self._masks.items():
            grad = masked[name].grad if name in masked else None
            if grad is not None:
                grad.masked_fill_(zeros, 0)
        if self.params.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(list(self._trainable.values()), self.params.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, zeros in self._masks.items():
                if name in masked:
                    masked[name].masked_fill_(zeros, 0)
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def run(self, on_step: Callable[[Trainer], None] | None = None) -> TrainResult:
        """Train until :attr:`steps`, calling ``on_step(self)`` after each step (to
        save a checkpoint; an exception there stops training, the state intact)."""
        started = time.perf_counter()
        bar = tqdm(total=self.steps, initial=self.step, desc=f"finetune ({self.params.method})",
                   unit="step", disable=not self.progress)
        try:
            while self.step < self.steps:
                loss = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if on_step is not None:
                    on_step(self)
        finally:
            bar.close()
        return self.result(time.perf_counter() - started)

    def result(self, seconds: float = 0.0) -> TrainResult:
        """The steps, tokens and losses so far, with ``seconds`` as the time taken."""
        done = min(self.step * self.params.batch_size, self.sequences)
        return TrainResult(self.step, done * self.data.shape[1], list(self.losses), seconds)

    # -- results and checkpoints ---------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """Copies of the trained values of every parameter training changed, by its
        name in the model without adapters: the trained parameters (full), or each
        adapted weight with its adapter merged in (lora), exact zeros kept zero.
        :func:`loaded_weights` puts them into the model with the same candidate
        applied."""
        with torch.no_grad():
            if self._lora is None:
                return {n: p.detach().clone() for n, p in self._trainable.items()}
            out = {}
            for name, layer in self._layers():
                base = layer.get_base_layer().weight
                merged = base + layer.get_delta_weight(_ADAPTER).to(base.dtype)
                zeros = self._masks.get(f"{name}.weight")
                if zeros is not None:
                    merged.masked_fill_(zeros, 0)
                out[f"{name}.weight"] = merged
            return out

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: step, losses, trainable tensors (copies),
        optimizer and schedule state. No RNG state: the data order follows from the
        seed and the step, and the model runs without dropout."""
        return {
            "step": self.step,
            "losses": list(self.losses),
            "trainable": {n: p.detach().clone() for n, p in self._trainable.items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a run with the same model, candidate,
        data and parameters."""
        tensors = state["trainable"]
        if set(tensors) != set(self._trainable):
            raise EvocompError("the checkpoint trains other parameters than this run")
        for name, p in self._trainable.items():
            if tensors[name].shape != p.shape:
                raise EvocompError(f"the checkpoint's {name!r} has another shape")
        with torch.no_grad():
            for name, p in self._trainable.items():
                p.copy_(tensors[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]


def _add_adapters(
    model: nn.Module, params: TrainParams, removed: Collection[str]
) -> Any:
    """Inject peft LoRA adapters into the blocks' linear layers (not removed ones)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    targets = _lora_targets(model, removed)
    if not targets:
        raise EvocompError("the model has no linear layer left to adapt with LoRA")
    most = min(min(m.weight.shape) for _, m in targets)
    if params.lora_rank > most:
        raise EvocompError(
            f"lora_rank={params.lora_rank} exceeds {most}, the smallest dimension of the "
            "linear layers it would adapt"
        )
    transposed = {type(m).__name__ == "Conv1D" for _, m in targets}
    if len(transposed) > 1:
        raise EvocompError("LoRA cannot adapt a mix of Linear and Conv1D layers at once")
    config = LoraConfig(
        r=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=0.0,
        target_modules=[name for name, _ in targets],
        fan_in_fan_out=transposed == {True},
        bias="none",
    )
    # Seeded without touching the caller's global RNG: the adapters' init is part of
    # the run (a fresh start with the same seed makes the same adapters).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        return LoraModel(model, config, _ADAPTER)


@contextmanager
def training(
    model: nn.Module,
    data: torch.Tensor,
    params: TrainParams,
    *,
    teacher: nn.Module | None = None,
    frozen: Collection[str] = (),
    removed: Collection[str] = (),
    progress: bool = False,
) -> Iterator[Trainer]:
    """A :class:`Trainer` for ``model`` (a candidate applied in place) on ``data``
    (``[sequences, seq_len]`` token ids); on exit the model is as it was, bit for bit.

    ``teacher``: the model to distil from (``params.kd_weight > 0``), e.g. a copy of
    the dense model. ``frozen``: parameter names ``full`` training must not change
    (quantized weights; LoRA still adapts them). ``removed``: module names of
    sublayers the candidate removed; nothing under them is trained or adapted.

    Working copies, not the model's tensors, are trained: the tensors a swapper
    pointed the model at (shared variant caches) are never written, and restoring
    needs no second copy.
    """
    if params.kd_weight and teacher is None:
        raise EvocompError("kd_weight > 0 needs a teacher model")
    _sequences(data.shape[0], params, data.shape[1])
    removed = tuple(removed)
    flags = {p: p.requires_grad for p in model.parameters()}
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    # peft sizes LoRA by in/out_features, which narrowing leaves at the dense size.
    shapes: list[tuple[nn.Linear, int, int]] = []
    lora: Any = None
    was_training = model.training
    try:
        model.eval()  # no dropout: a resumed run repeats an uninterrupted one
        if params.method == "lora":
            for _, module in _lora_targets(model, removed):
                if isinstance(module, nn.Linear):
                    shapes.append((module, module.in_features, module.out_features))
                    module.out_features, module.in_features = module.weight.shape
            lora = _add_adapters(model, params, removed)
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        else:
            trainable = {
                n: p for n, p in model.named_parameters()
                if n not in frozen and not _under(n, removed) and p.is_floating_point()
            }
            for p in trainable.values():
                saved.append((p, p.data))
                p.data = p.data.clone()
                p.requires_grad_(True)
        yield Trainer(model, data, params, trainable, teacher=teacher, lora=lora,
                      progress=progress)
    finally:
        if lora is not None:
            lora.unload()
        for module, fan_in, fan_out in shapes:
            module.in_features, module.out_features = fan_in, fan_out
        for p, data in reversed(saved):
            p.data = data
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
