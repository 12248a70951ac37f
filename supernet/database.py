"""The variant database: for each (unit, level) the compressed weight, computed
once from calibration activations and stored on disk as safetensors.

Layout of a database directory::

    manifest.json          key parts, units, variants, finished blocks
    block_000.safetensors  tensors named "<unit name>@<variant key>" (see variant_name)
    ...

Builds go block by block with the calibration inputs propagated through the
dense model, so peak memory is the model plus one block's activations; every
finished block is written atomically and recorded, so an interrupted build
resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from evocomp.errors import EvocompError
from evocomp.paths import locked
from evocomp.spaces.units import Unit, VariantKey, variant_key
from evocomp.supernet.compressors import COMPRESSORS, LayerCompressor
from evocomp.supernet.units import find_blocks

log = logging.getLogger("evocomp")

FORMAT_VERSION = 1

def variant_name(unit: str, key: VariantKey) -> str:
    """The stored tensor name of ``unit`` at ``key``: ``unit@7`` for an int key (the
    names of the first databases), ``unit@1024x3`` for a tuple."""
    key = variant_key(key)
    if isinstance(key, tuple):
        return f"{unit}@{'x'.join(str(k) for k in key)}"
    return f"{unit}@{key}"


def database_key(parts: dict[str, Any]) -> str:
    """A stable digest of everything that determines the stored weights."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


@dataclass(frozen=True)
class DatabaseSpec:
    """What a database must contain; its ``key`` names it."""

    model_fingerprint: str
    compressor: str
    compressor_params: dict[str, Any]
    calibration_fingerprint: str
    dtype: str
    variants: dict[str, list[VariantKey]]  # unit name -> variant keys (e.g. zero counts)

    def parts(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "model": self.model_fingerprint,
            "compressor": self.compressor,
            "compressor_params": self.compressor_params,
            "calibration": self.calibration_fingerprint,
            "dtype": self.dtype,
            # Tuples serialize as lists, so a spec hashes the same before and after
            # a JSON round trip.
            "variants": hashlib.sha256(
                json.dumps(self.variants, sort_keys=True).encode()
            ).hexdigest(),
        }

    @property
    def key(self) -> str:
        return database_key(self.parts())


class VariantDatabase:
    """Read access to a finished database; tensors are loaded lazily from the
    memory-mapped block files and kept in a bounded LRU cache."""

    def __init__(self, root: Path, manifest: dict[str, Any], *, cache_bytes: int) -> None:
        self.root = root
        self.manifest = manifest
        self._block_of: dict[str, int] = {
            name: info["block"] for name, info in manifest["units"].items()
        }
        self._variants: dict[str, list[VariantKey]] = {
            name: [variant_key(k) for k in info["variants"]]
            for name, info in manifest["units"].items()
        }
        self._cache: OrderedDict[tuple[str, VariantKey, str], torch.Tensor] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    def variants(self, unit: str) -> list[VariantKey]:
        """The variant keys stored for ``unit`` (tuples again, where JSON made lists)."""
        if unit not in self._block_of:
            raise EvocompError(f"database {self.root} has no unit {unit!r}")
        return list(self._variants[unit])

    def get(
        self, unit: str, variant: VariantKey, *, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The stored weight of ``unit`` at ``variant`` (module layout), on ``device``."""
        variant = variant_key(variant)  # a list would not hash
        ck = (unit, variant, str(device))
        hit = self._cache.get(ck)
        if hit is not None:
            self._cache.move_to_end(ck)
            return hit
        if unit not in self._block_of:
            raise EvocompError(f"database {self.root} has no unit {unit!r}")
        # Checked here: safetensors reports a missing name like a corrupt file.
        if variant not in self._variants[unit]:
            held = self._variants[unit]
            raise EvocompError(
                f"database {self.root} has no variant {variant!r} of {unit!r}; it holds "
                f"{len(held)}: {', '.join(map(repr, held[:8]))}{', ...' if len(held) > 8 else ''}"
            )
        path = self.root / _block_file(self._block_of[unit])
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                # A view into the memory-mapped file is misaligned (the header has
                # arbitrary length), which slowed CPU matmuls ~5% (measured); the
                # clone is aligned and resident while it stays in the cache.
                tensor = f.get_tensor(variant_name(unit, variant)).clone()
        except (SafetensorError, OSError) as err:
            raise EvocompError(
                f"database file {path} is corrupt or unreadable ({err}); delete {self.root} "
                "and run `evocomp database build` again"
            ) from None
        self._cache[ck] = tensor
        self._cached += tensor.numel() * tensor.element_size()
        while self._cached > self._cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.numel() * old.element_size()
        return tensor


def _order(key: VariantKey) -> tuple[int, ...]:
    return key if isinstance(key, tuple) else (key,)


def _block_file(block: int) -> str:
    return f"block_{block:03d}.safetensors"


def open_database(root: Path, spec: DatabaseSpec, *, cache_gb: float = 8.0) -> VariantDatabase:
    """Open a finished database, refusing one built from other inputs."""
    manifest = _read_manifest(root)
    if manifest is None or not manifest.get("complete"):
        raise EvocompError(f"no finished variant database at {root}; run `evocomp database build`")
    _check_same(root, manifest, spec)
    for block in sorted({info["block"] for info in manifest["units"].values()}):
        _verify_block_file(root / _block_file(block))
    return VariantDatabase(root, manifest, cache_bytes=int(cache_gb * 2**30))


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvocompError(f"database manifest {path} is corrupt ({err}); delete {root}") from None


def _check_same(root: Path, manifest: dict[str, Any], spec: DatabaseSpec) -> None:
    if manifest.get("key") == spec.key:
        return
    theirs = manifest.get("parts", {})
    differ = sorted(k for k, v in spec.parts().items() if theirs.get(k) != v) or ["key"]
    if differ == ["variants"] and manifest.get("complete") and _holds(manifest, spec):
        return  # a finished database with more levels serves any subset of them
    raise EvocompError(
        f"the variant database at {root} was built from different inputs (differs in: "
        f"{', '.join(differ)}); point database.path elsewhere or delete it to rebuild"
    )


def _holds(manifest: dict[str, Any], spec: DatabaseSpec) -> bool:
    """Whether the manifest's units hold every variant ``spec`` asks for."""
    units = manifest.get("units", {})
    for name, keys in spec.variants.items():
        if name not in units:
            return False
        stored = {variant_key(k) for k in units[name].get("variants", [])}
        if not {variant_key(k) for k in keys} <= stored:
            return False
    return True


def _verify_block_file(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, Exception) as err:
        raise EvocompError(
            f"database file {path} is missing or corrupt ({err}); run `evocomp database build` "
            "to rebuild the missing blocks"
        ) from None


class _StopForward(Exception):
    pass


def capture_block_inputs(
    model: nn.Module, tokens: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Run the model up to its first block and keep what the block receives:
    hidden states and keyword arguments (masks, rotary embeddings), per batch."""
    _, blocks = find_blocks(model)
    device = next(model.parameters()).device
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in tokens.split(batch_size):
            with suppress(_StopForward):
                model(batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


# unit name -> (its compressor, the forward hook feeding it)
_Attached: TypeAlias = dict[str, tuple[LayerCompressor, RemovableHandle]]


def build_database(
    model: nn.Module,
    units: Sequence[Unit],
    spec: DatabaseSpec,
    root: Path,
    calibration: torch.Tensor,
    *,
    params: Any = None,
    batch_size: int = 4,
    progress: bool = True,
    on_block: Callable[[int], None] | None = None,
) -> bool:
    """Compute and store every variant in ``spec``, block by block.

    Resumes a partial build of the same spec; refuses a directory holding a
    database of another spec. Returns False when the database was already complete.
    Concurrent builders of one database (workers, sweep trials) take turns: the
    first builds, the others find it complete.
    """
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / ".lock"):
        return _build_database(
            model, units, spec, root, calibration, params=params, batch_size=batch_size,
            progress=progress, on_block=on_block,
        )


def _build_database(
    model: nn.Module,
    units: Sequence[Unit],
    spec: DatabaseSpec,
    root: Path,
    calibration: torch.Tensor,
    *,
    params: Any,
    batch_size: int,
    progress: bool,
    on_block: Callable[[int], None] | None,
) -> bool:
    manifest = _start_manifest(root, spec, units)
    if manifest.get("complete"):
        return False
    compressor_cls = COMPRESSORS.get(spec.compressor)
    by_block: dict[int, list[Unit]] = {}
    for u in units:
        by_block.setdefault(u.block, []).append(u)
    _, blocks = find_blocks(model)
    done = set(manifest["done_blocks"])
    # Only blocks up to the last one with units need the calibration forward.
    last = max(by_block)
    with torch.inference_mode():
        inputs = capture_block_inputs(model, calibration, batch_size)
        bar = tqdm(range(last + 1), desc="database", unit="block", disable=not progress)
        for b in bar:
            todo = [] if b in done else by_block.get(b, [])
            compressors = _attach(model, todo, compressor_cls, params)
            inputs = _forward_block(blocks[b], inputs, compressors)
            if todo:
                tensors = _compress_block(model, todo, compressors, spec)
                del compressors  # free the calibration statistics before the next block
                _write_block(root, b, tensors, manifest, done)
            if on_block is not None:
                on_block(b)
    manifest["complete"] = True
    _atomic_write_json(root / "manifest.json", manifest)
    return True


def _start_manifest(root: Path, spec: DatabaseSpec, units: Sequence[Unit]) -> dict[str, Any]:
    """The manifest of a build of ``spec`` at ``root``: the one there (refused if it is
    another spec's; it may already say ``complete``) or a new one, written at once."""
    manifest = _read_manifest(root)
    if manifest is not None:
        _check_same(root, manifest, spec)
        return manifest
    manifest = {
        "key": spec.key,
        "parts": spec.parts(),
        "units": {
            u.name: {
                "block": u.block,
                "shape": list(u.shape),
                "variants": spec.variants[u.name],
            }
            for u in units
        },
        "done_blocks": [],
        "complete": False,
    }
    _atomic_write_json(root / "manifest.json", manifest)
    return manifest


def _forward_block(
    block: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]], compressors: _Attached
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Run ``block`` on every calibration batch (feeding the attached compressors) and
    return its outputs, the next block's inputs; the hooks are removed afterwards."""
    try:
        return [(_block_output(block(hidden, **kw)), kw) for hidden, kw in inputs]
    finally:
        for _, handle in compressors.values():
            handle.remove()


def _compress_block(
    model: nn.Module, units: Sequence[Unit], compressors: _Attached, spec: DatabaseSpec
) -> dict[str, torch.Tensor]:
    """Every variant of ``units`` (one block's), by stored tensor name: in module layout
    (Conv1D transposed back), in the weight's dtype, contiguous, on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for u in units:
        comp, _ = compressors[u.name]
        weight = model.get_submodule(u.name).weight
        # Sorted, so that a composite compressor sees every (zeros, bits) of one
        # zero count together and can reuse its pruned weight.
        for key in sorted(map(variant_key, spec.variants[u.name]), key=_order):
            w = comp.compress(key)
            tensors[variant_name(u.name, key)] = (
                (w.T if u.transposed else w).to(weight.dtype).contiguous().cpu()
            )
    return tensors


def _write_block(
    root: Path, block: int, tensors: dict[str, torch.Tensor], manifest: dict[str, Any],
    done: set[int],
) -> None:
    """Write ``block``'s file atomically, then record the block as done (in ``done``
    and in the manifest on disk)."""
    tmp = root / (_block_file(block) + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, root / _block_file(block))
    manifest["done_blocks"] = sorted(done | {block})
    done.add(block)
    _atomic_write_json(root / "manifest.json", manifest)


def _attach(
    model: nn.Module, units: Iterable[Unit], cls: type[LayerCompressor], params: Any
) -> _Attached:
    """A compressor per unit, fed the unit's inputs by a forward hook."""
    attached = {}
    for u in units:
        module = model.get_submodule(u.name)
        weight = module.weight.detach()
        comp = cls(weight.T if u.transposed else weight, params)

        def feed(_m: nn.Module, args: tuple, _out: Any, comp: LayerCompressor = comp) -> None:
            comp.add_batch(args[0])

        attached[u.name] = (comp, module.register_forward_hook(feed))
    return attached
