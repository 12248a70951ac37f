"""``evocomp finetune``: recovery fine-tuning of a run's best candidate.

The searched model is trained in place, with its structure kept (see
:mod:`evocomp.supernet.training`), by distillation from a copy of the dense model,
on text of the run's corpus that neither the search nor the held-out evaluation
saw. Everything goes to ``RUN_DIR/finetune/``:

* ``options.json``: the training options and the genome, written when training
  starts; a rerun with other options is refused (``--restart`` starts afresh);
* ``checkpoint.pt``: the trainer's state every ``--checkpoint-every`` steps, written
  atomically, so a killed fine-tune resumes from it and ends as an uninterrupted one
  would; removed once the fine-tune is finished;
* ``weights.safetensors``: the trained values of what training changed, by
  parameter name, as the model holds them with the genome applied;
* ``finetune.json``: options, tokens, seconds and the held-out table (perplexity and
  KL to dense of dense / before / after); its presence marks the fine-tune finished,
  and a rerun reuses it.

``evocomp export`` exports the fine-tuned weights of a finished fine-tune.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from evocomp.config import Config
from evocomp.errors import EvocompError
from evocomp.evaluators.data import NotEnoughText, training_tokens
from evocomp.evaluators.metrics import KLEvaluator
from evocomp.runner import Experiment, RunDir, write_json
from evocomp.spaces.base import Genome
from evocomp.supernet.shrink import widened
from evocomp.supernet.training import (
    Trainer,
    TrainParams,
    loaded_weights,
    max_lora_rank,
    training,
)

log = logging.getLogger("evocomp")

TEACHERS = ("dense", "none")
"""``--teacher``: distil from the dense model, or train on the text alone (LM loss)."""

OPTIONS = {
    "tokens": "--tokens",
    "method": "--method",
    "teacher": "--teacher",
    "lm_weight": "--lm-weight",
    "lr": "--lr",
    "lora_rank": "--lora-rank",
    "batch_size": "--batch-size",
}
"""The options that make a fine-tune what it is (a rerun must repeat them), as the
command line names them."""


@dataclass(frozen=True)
class FinetuneDir:
    """The files of a run's fine-tune."""

    path: Path

    @classmethod
    def of(cls, run: RunDir) -> FinetuneDir:
        return cls(run.path / "finetune")

    @property
    def options(self) -> Path:
        return self.path / "options.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def weights(self) -> Path:
        return self.path / "weights.safetensors"

    @property
    def result(self) -> Path:
        return self.path / "finetune.json"

    def recorded(self) -> dict[str, Any] | None:
        """The options (and genome) of the fine-tune here, if one was started."""
        return json.loads(self.options.read_text()) if self.options.exists() else None


# -- options ---------------------------------------------------------------------------


def _params(options: dict[str, Any]) -> TrainParams:
    """Training parameters from command-line options (absent ones take defaults),
    the learning rate resolved, so that equal runs record equal options."""
    teacher = options.get("teacher", "dense")
    default_lm = 0.0 if teacher == "dense" else 1.0
    fields = {k: options[k] for k in ("tokens", "method", "lr", "lora_rank", "batch_size")
              if options.get(k) is not None}
    try:
        params = TrainParams(
            **fields,
            kd_weight=1.0 if teacher == "dense" else 0.0,
            lm_weight=options.get("lm_weight", default_lm),
        )
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = str(e["loc"][0]) if e["loc"] else ""
            if field in OPTIONS:
                problems.append(f"{OPTIONS[field]} {e['input']}: {e['msg']}")
            else:  # the only check across fields: some loss to train on
                problems.append("--teacher none trains on the next-token loss alone, so "
                                "--lm-weight must be above 0")
        raise EvocompError("bad fine-tuning option: " + "; ".join(problems)) from None
    return params.model_copy(update={"lr": params.peak_lr})


def _identity(params: TrainParams, teacher: str) -> dict[str, Any]:
    """The recorded form of a fine-tune's options (what a rerun must match)."""
    return {"teacher": teacher, **params.model_dump()}


def _show(identity: dict[str, Any], keys: list[str] | None = None) -> str:
    return " ".join(f"{OPTIONS[k]} {identity[k]}" for k in (keys or list(OPTIONS)))


def resolve(
    given: dict[str, Any], recorded: dict[str, Any] | None, where: Path
) -> tuple[TrainParams, str]:
    """The fine-tune's parameters and teacher: ``given`` options over those of the
    fine-tune ``recorded`` in ``where`` (or the defaults). A given option that
    differs from the recorded one is an error: that is another fine-tune."""
    given = {k: v for k, v in given.items() if v is not None}
    if recorded is None:
        teacher = given.get("teacher", "dense")
        return _params(given), teacher
    before = recorded["options"]
    merged = {**{k: before[k] for k in OPTIONS}, **given}
    params, teacher = _params(merged), merged["teacher"]
    now = _identity(params, teacher)
    clash = [k for k in OPTIONS if now[k] != before[k]]
    if clash:
        raise EvocompError(
            f"{where} holds a fine-tune with {_show(before, clash)}, not "
            f"{_show(now, clash)}; rerun with its options to resume or reuse it, or add "
            "--restart to replace it"
        )
    return params, teacher


# -- what the genome fixes -------------------------------------------------------------


def _removed(exp: Experiment, genome: Genome) -> list[str]:
    return [u.name for u in exp.swapper.removed(genome)]


def export_weights(
    exp: Experiment, genome: Genome, model: torch.nn.Module, weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``weights`` (trained with ``genome`` applied) in the full-size layout of
    ``exp.applied(genome, export=True)``, which ``model`` is in: narrowed sublayers'
    trained rows and columns put back in place, the removed ones zero."""
    out = dict(weights)
    for unit, kept in exp.swapper.narrowed(genome):
        prefix = unit.name + "."
        mine = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        if mine:
            full = widened(model.get_submodule(unit.name), unit.kind, kept, mine)
            out.update({prefix + k: v for k, v in full.items()})
    return out


# -- finished fine-tunes ---------------------------------------------------------------


@dataclass(frozen=True)
class Finetuned:
    """A finished fine-tune: its record (``finetune.json``) and weights."""

    record: dict[str, Any]
    weights: dict[str, torch.Tensor]


def finetuned(run: RunDir, genome: Genome) -> Finetuned | None:
    """The run's finished fine-tune of ``genome``, or None when it has none (an
    unfinished one is logged). A fine-tune of another genome (the search went on
    after it) is an error: its weights belong to another candidate."""
    ft = FinetuneDir.of(run)
    if not ft.result.exists():
        if ft.options.exists():
            log.warning("%s holds an unfinished fine-tune; `evocomp finetune %s` finishes it",
                        ft.path, run.path)
        return None
    record = json.loads(ft.result.read_text())
    if tuple(record["genome"]) != tuple(genome):
        raise EvocompError(
            f"the fine-tune in {ft.path} is of an earlier best genome than best.json's; "
            f"`evocomp finetune {run.path} --restart` fine-tunes the current one "
            "(or export with --no-finetune)"
        )
    return Finetuned(record, load_file(str(ft.weights)))


# -- the command -----------------------------------------------------------------------


def _atomic(path: Path, write: Any) -> None:
    """``write(tmp)`` then rename onto ``path``: a kill leaves the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def recover(
    cfg: Config,
    run: RunDir,
    genome: Genome,
    given: dict[str, Any],
    *,
    restart: bool = False,
    checkpoint_every: int = 10,
    progress: bool = True,
) -> tuple[dict[str, Any], bool]:
    """Fine-tune the run's ``genome`` (or resume, or reuse a finished fine-tune);
    returns ``finetune.json``'s content and whether it was reused. Every check runs
    before anything is written."""
    ft = FinetuneDir.of(run)
    recorded = None if restart else ft.recorded()
    params, teacher = resolve(given, recorded, ft.path)
    if checkpoint_every < 1:
        raise EvocompError(f"--checkpoint-every {checkpoint_every}: must be at least 1 step")
    seq_len = cfg.data.seq_len
    if params.tokens < seq_len:
        raise EvocompError(
            f"--tokens {params.tokens} is less than one training sequence "
            f"(data.seq_len={seq_len} tokens); give --tokens >= {seq_len}"
        )
    if recorded is not None and tuple(recorded["genome"]) != tuple(genome):
        raise EvocompError(
            f"{ft.path} holds a fine-tune of an earlier best genome than best.json's (the "
            "search went on since); add --restart to fine-tune the current one"
        )
    if recorded is not None and ft.result.exists():
        return json.loads(ft.result.read_text()), True
    if cfg.data.heldout == 0:
        raise EvocompError("data.heldout is 0: the fine-tune's before/after table needs "
                           "held-out sequences")

    exp = Experiment(cfg, progress=progress)
    try:
        data = training_tokens(cfg.data, exp.loaded.tokenizer, params.tokens)
    except NotEnoughText as err:
        raise EvocompError(
            f"--tokens {params.tokens} exceeds the {err.available} training tokens the run's "
            f"corpus holds outside its search and held-out splits ({err}); lower --tokens"
        ) from None
    removed = _removed(exp, genome)
    if params.method == "lora":
        with exp.applied(genome) as model:
            most = max_lora_rank(model, removed)
        if params.lora_rank > most:
            raise EvocompError(
                f"--lora-rank {params.lora_rank} exceeds {most}, the smallest dimension of "
                f"the linear layers LoRA would adapt; give --lora-rank <= {most}"
            )

    if restart:
        shutil.rmtree(ft.path, ignore_errors=True)
    ft.path.mkdir(parents=True, exist_ok=True)
    identity = _identity(params, teacher)
    if recorded is None:
        write_json(ft.options, {"options": identity, "genome": list(genome)})
    trained = _train(exp, genome, data, params, teacher, removed, ft, checkpoint_every)
    weights = load_file(str(ft.weights))
    report = {
        "options": identity,
        "genome": list(genome),
        **trained,
        **_compare(exp, genome, weights),
    }
    write_json(ft.result, report)
    ft.checkpoint.unlink(missing_ok=True)  # as large as the model and its optimizer
    return report, False


def _train(
    exp: Experiment,
    genome: Genome,
    data: torch.Tensor,
    params: TrainParams,
    teacher: str,
    removed: list[str],
    ft: FinetuneDir,
    every: int,
) -> dict[str, Any]:
    """Train (from the last checkpoint, if any) and write ``weights.safetensors``;
    returns what the training did. Weights already written (killed before the
    evaluation) are not trained again."""
    if ft.weights.exists():
        with open(ft.weights, "rb") as fh:  # the header's metadata: no tensor is read
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        return json.loads(header["__metadata__"]["trained"])
    # One copy of the dense model, taken before the genome is applied.
    dense = copy.deepcopy(exp.model) if teacher == "dense" else None
    done_before = 0.0
    state = None
    if ft.checkpoint.exists():
        state = torch.load(ft.checkpoint, weights_only=True)
        done_before = float(state["seconds"])
        log.info("resuming the fine-tune at step %d from %s", state["trainer"]["step"],
                 ft.checkpoint)
    started = time.perf_counter()

    def save(trainer: Trainer) -> None:
        if trainer.step % every and trainer.step < trainer.steps:
            return
        payload = {"trainer": trainer.state_dict(),
                   "seconds": done_before + time.perf_counter() - started}
        _atomic(ft.checkpoint, lambda tmp: torch.save(payload, tmp))

    with (
        exp.applied(genome) as model,
        training(model, data, params, teacher=dense, frozen=exp.quantized(genome),
                 removed=removed, progress=exp.progress) as trainer,
    ):
        if state is not None:
            trainer.load_state_dict(state["trainer"])
        result = trainer.run(on_step=save)
        weights = trainer.weights()
    trained = {
        "tokens": result.tokens,
        "steps": result.steps,
        "seconds": round(done_before + time.perf_counter() - started, 1),
        "loss": {"first": result.losses[0], "last": result.losses[-1]},
        "frozen_quantized": len(exp.quantized(genome)),
    }
    log.info("fine-tuned on %d tokens in %d steps, %.0f s; loss %.4f -> %.4f",
             result.tokens, result.steps, trained["seconds"], result.losses[0], result.losses[-1])
    metadata = {"trained": json.dumps(trained)}
    _atomic(ft.weights, lambda tmp: save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=metadata))
    return trained


def _compare(
    exp: Experiment, genome: Genome, weights: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Held-out perplexity and KL to the dense model of dense, the searched model
    before fine-tuning, and after."""
    heldout = exp.splits.heldout
    ev = KLEvaluator.create(
        exp.model, heldout, KLEvaluator.Params(batch_size=exp.cfg.final_eval.batch_size),
        progress=exp.progress,
    )
    out: dict[str, dict[str, float]] = {"ppl": {}, "kl": {}}
    for name in ("dense", "before", "after"):
        with exp.applied(None if name == "dense" else genome) as model:
            if name == "after":
                with loaded_weights(model, weights):
                    metrics = ev.evaluate(model)
            else:
                metrics = ev.evaluate(model)
        out["ppl"][name] = metrics["ppl"]
        out["kl"][name] = 0.0 if name == "dense" else metrics["kl"]
        log.info("held-out %-6s ppl %.3f kl %.5f", name, metrics["ppl"], out["kl"][name])
    ppl = out["ppl"]
    gap = ppl["before"] - ppl["dense"]
    return {
        "heldout_tokens": int(heldout.numel()),
        **out,
        "gap_closed": (ppl["before"] - ppl["after"]) / gap if gap > 0 else None,
    }


def table(report: dict[str, Any]) -> str:
    """The before/after table of a fine-tune, for the terminal."""
    lines = [f"held-out ({report['heldout_tokens']} tokens)   perplexity   KL to dense"]
    for name in ("dense", "before", "after"):
        lines.append(
            f"  {name:<20} {report['ppl'][name]:10.3f}   {report['kl'][name]:11.5f}"
        )
    o = report["options"]
    closed = report.get("gap_closed")
    share = "" if closed is None else f"; closes {100 * closed:.1f}% of the perplexity gap"
    lines.append(
        f"fine-tuned ({o['method']}, teacher {o['teacher']}) on {report['tokens']} tokens in "
        f"{report['steps']} steps, {report['seconds']:.0f} s{share}"
    )
    return "\n".join(lines)


__all__ = ["FinetuneDir", "Finetuned", "export_weights", "finetuned", "recover", "table"]
