"""The variant database: for each (unit, level) the compressed weight, computed
once from calibration activations and stored on disk as safetensors.

Layout of a database directory::

    manifest.json          key parts, units, variants, finished blocks, checksums,
                           each stored weight's encoding (``encodings``)
    block_000.safetensors  tensors named "<unit name>@<variant key>" (see variant_name)
    ...

Each stored weight takes the smallest exact form (:mod:`.encoding`): quantized
weights as packed integer codes on their stored grid (``unit@3:codes`` beside the
``unit@3.scale`` and ``unit@3.zero`` parts), sparse ones as a bitmask and their
nonzero values (``unit@7:mask``, ``unit@7:values``), the others dense under their
own name as before. The manifest's ``encodings`` list every weight not stored
dense, per block file; a block without that record (written before encodings,
``storage`` 1) is dense throughout and is read as it is. Parts are stored dense.
:meth:`VariantDatabase.get` decodes, so readers see the same tensors either way.

Builds go block by block with the calibration inputs propagated through the
dense model, or through each block's start variants (the search's starting point)
for compressors that ask (:meth:`.LayerCompressor.needs_start`), so peak memory is
the model plus one block's activations; every
finished block is written atomically and recorded with its size and SHA-256, so
an interrupted build resumes where it stopped. A block file is hashed once per
process before its tensors are used (a build checks every finished block first
and rebuilds those that are missing or fail their checksum); databases written
before checksums were recorded are only checked for readability.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from evocomp.errors import EvocompError
from evocomp.paths import locked
from evocomp.spaces.units import Unit, VariantKey, variant_key
from evocomp.supernet import encoding
from evocomp.supernet.compressors import COMPRESSORS, LayerCompressor
from evocomp.supernet.offload import blocks_on_device
from evocomp.supernet.structured import KEPT
from evocomp.supernet.sublayers import first_output
from evocomp.supernet.units import find_blocks
from evocomp.supernet.widths import Batch, WidthVariant, build_width_block, propagates

log = logging.getLogger("evocomp")

FORMAT_VERSION = 1
"""Part of every database key; bumping it renames (rebuilds) every database."""

STORAGE_VERSION = 2
"""How block files store tensors, recorded in the manifest as ``storage`` but not in
the key: 1 (absent) every tensor dense; 2 weights in their smallest exact encoding.
A reader handles every version up to its own, so databases keep their key and are
read as written, never rebuilt for it."""

_ENCODE = True
"""Whether builds encode weights (off: the dense storage-1 layout; for benchmarks)."""

def variant_name(unit: str, key: VariantKey, part: str = "") -> str:
    """The stored tensor name of ``unit`` at ``key``: ``unit@7`` for an int key (the
    names of the first databases), ``unit@1024x3`` for a tuple; a ``part`` other than
    the weight (see :attr:`.LayerCompressor.parts`) is appended, ``unit@6x3.kept``."""
    key = variant_key(key)
    name = f"{unit}@{'x'.join(str(k) for k in key)}" if isinstance(key, tuple) else f"{unit}@{key}"
    return f"{name}.{part}" if part else name


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
    through: dict[str, VariantKey] | None = None
    """The start variants calibration inputs are propagated through, for compressors
    that ask (:meth:`.LayerCompressor.needs_start`); None for the others."""

    def parts(self) -> dict[str, Any]:
        extra = {}
        if self.through is not None:
            extra["through"] = hashlib.sha256(
                json.dumps(self.through, sort_keys=True).encode()
            ).hexdigest()
        return extra | {
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
        self._cache: OrderedDict[tuple[str, VariantKey, str, str], torch.Tensor] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._checked: set[int] = set()  # blocks whose file matched its checksum

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    def variants(self, unit: str) -> list[VariantKey]:
        """The variant keys stored for ``unit`` (tuples again, where JSON made lists)."""
        if unit not in self._block_of:
            raise EvocompError(f"database {self.root} has no unit {unit!r}")
        return list(self._variants[unit])

    def stored_parts(self, unit: str) -> tuple[str, ...]:
        """The parts stored with each variant of ``unit`` besides its weight (see
        :attr:`.LayerCompressor.parts`; none in databases built before they were)."""
        if unit not in self._block_of:
            raise EvocompError(f"database {self.root} has no unit {unit!r}")
        return tuple(self.manifest["units"][unit].get("parts", ()))

    def holds(self, unit: str) -> bool:
        """Whether the database stores variants of ``unit``."""
        return unit in self._block_of

    def get(
        self,
        unit: str,
        variant: VariantKey,
        *,
        part: str = "",
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """The stored weight of ``unit`` at ``variant`` (module layout), on ``device``;
        with ``part``, that stored part of the variant instead (e.g. ``"kept"``)."""
        variant = variant_key(variant)  # a list would not hash
        ck = (unit, variant, part, str(device))
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
        block = self._block_of[unit]
        path = self.root / _block_file(block)
        if block not in self._checked:
            # Once per file and process, before any of its tensors is used.
            why = _checksum_problem(path, _recorded(self.manifest, block))
            if why is not None:
                raise EvocompError(
                    f"database file {path} {why}; run `evocomp database build` to rebuild it"
                )
            self._checked.add(block)
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                name = variant_name(unit, variant, part)
                tensor = _load(f, name, _encodings(self.manifest, block))
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


def _encodings(manifest: dict[str, Any], block: int) -> dict[str, dict[str, Any]]:
    """The encodings of ``block``'s weights not stored dense, by stored name (none in
    a block written before encodings)."""
    return manifest.get("encodings", {}).get(_block_file(block), {})


def _stored_names(name: str, encodings: dict[str, dict[str, Any]]) -> list[str]:
    """The tensors a block file holds for the stored tensor ``name``."""
    meta = encodings.get(name)
    if meta is None:
        return [name]
    return [f"{name}:{piece}" for piece in encoding.PIECES[meta["encoding"]]] or [name]


def _load(f: Any, name: str, encodings: dict[str, dict[str, Any]]) -> torch.Tensor:
    """The stored tensor ``name`` of the open block file ``f``, decoded (see
    :mod:`.encoding`), as an aligned tensor of its own."""
    meta = encodings.get(name)
    if meta is None or meta["encoding"] == encoding.DENSE:
        # A view into the memory-mapped file is misaligned (the header has
        # arbitrary length), which slowed CPU matmuls ~5% (measured); the
        # clone is aligned and resident while it stays in the cache.
        return f.get_tensor(name).clone()
    pieces = {p: f.get_tensor(f"{name}:{p}") for p in encoding.PIECES[meta["encoding"]]}
    grid = None
    if meta["encoding"] == encoding.CODES:
        grid = (f.get_tensor(f"{name}.scale"), f.get_tensor(f"{name}.zero"))
    return encoding.decode(meta, pieces, grid)


def _encode_block(
    tensors: dict[str, torch.Tensor], weights: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """``tensors`` as a block file stores them: each of ``weights`` in its smallest
    exact encoding (a quantized one decoded with its ``scale``/``zero`` parts, which
    stay dense like every part); the encodings not dense, by stored name."""
    stored: dict[str, torch.Tensor] = {}
    encodings: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name not in weights:
            stored[name] = tensor
            continue
        scale, zero = tensors.get(f"{name}.scale"), tensors.get(f"{name}.zero")
        grid = (scale, zero) if scale is not None and zero is not None else None
        meta, pieces = encoding.encode(tensor, grid)
        if meta["encoding"] == encoding.DENSE:
            stored[name] = tensor
            continue
        encodings[name] = meta
        stored.update({f"{name}:{piece}": t for piece, t in pieces.items()})
    return stored, encodings


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
    _check_storage(root, manifest)
    # Cheap checks here (size, header, tensor names); each file is hashed when
    # first read (VariantDatabase.get), unless this process already did.
    for block in _blocks(manifest):
        why = _block_problem(root, manifest, block)
        if why is not None:
            raise EvocompError(
                f"database file {root / _block_file(block)} {why}; run `evocomp database build` "
                "to rebuild it"
            )
    return VariantDatabase(root, manifest, cache_bytes=int(cache_gb * 2**30))


def _check_storage(root: Path, manifest: dict[str, Any]) -> None:
    """Refuse a database whose block files a newer evocomp wrote in a layout this
    one cannot read (see :data:`STORAGE_VERSION`)."""
    if manifest.get("storage", 1) > STORAGE_VERSION:
        raise EvocompError(
            f"the variant database at {root} was written by a newer evocomp (storage "
            f"{manifest['storage']}, this one reads up to {STORAGE_VERSION}); upgrade "
            "evocomp, or point database.path elsewhere"
        )


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


def _blocks(manifest: dict[str, Any]) -> list[int]:
    """Every block the manifest's units live in, in order."""
    return sorted({info["block"] for info in manifest["units"].values()})


def _recorded(manifest: dict[str, Any], block: int) -> dict[str, Any] | None:
    """``{"sha256": ..., "bytes": ...}`` of ``block``'s file as written, or None for a
    file written before checksums were recorded."""
    return manifest.get("checksums", {}).get(_block_file(block))


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _block_problem(root: Path, manifest: dict[str, Any], block: int) -> str | None:
    """Why ``block``'s file cannot be used, found without reading its tensors:
    missing, another size than written, an unreadable header, or tensors missing
    that the manifest lists; None when it looks sound (see :func:`_checksum_problem`)."""
    path = root / _block_file(block)
    recorded = _recorded(manifest, block)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    except OSError as err:
        return f"is unreadable ({err.strerror})"
    if recorded is not None and size != recorded["bytes"]:
        return f"has {size} bytes, not the {recorded['bytes']} written (truncated or overwritten)"
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
    except Exception as err:  # safetensors raises several types for a damaged file
        return f"is unreadable ({_one_line(err)})"
    missing = _block_names(manifest, block) - names
    if missing:
        return f"lacks {len(missing)} of its tensors (e.g. {min(missing)})"
    return None


def _block_names(manifest: dict[str, Any], block: int) -> set[str]:
    """The tensors ``block``'s file must hold: every variant's weight (the pieces of
    its encoding, see :func:`_stored_names`) and parts."""
    encodings = _encodings(manifest, block)
    return {
        stored
        for name in _variant_names(manifest, block, parts=True)
        for stored in _stored_names(name, encodings)
    }


def _variant_names(manifest: dict[str, Any], block: int, *, parts: bool) -> set[str]:
    """The stored tensor names of ``block``'s variants: their weights, and with
    ``parts`` their parts too."""
    return {
        variant_name(name, variant_key(k), part)
        for name, info in manifest["units"].items()
        if info["block"] == block
        for k in info["variants"]
        for part in ("", *(info.get("parts", ()) if parts else ()))
    }


_HASH_CHUNK = 16 * 2**20

# (path, inode, size, mtime, sha256) of the block files that matched their
# checksum in this process: each is hashed once, however often it is opened.
_VERIFIED: set[tuple[str, int, int, int, str]] = set()


def _sha256(path: Path) -> str:
    """The SHA-256 of ``path``'s content, read in chunks (bounded memory)."""
    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _identity(path: Path, sha256: str) -> tuple[str, int, int, int, str]:
    st = path.stat()
    return (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, sha256)


def _checksum_problem(path: Path, recorded: dict[str, Any] | None) -> str | None:
    """None when ``path`` hashes to its recorded SHA-256 (hashed once per process)
    or has no checksum recorded; else why not."""
    if recorded is None:
        return None
    try:
        ident = _identity(path, recorded["sha256"])
        if ident in _VERIFIED:
            return None
        if ident[2] != recorded["bytes"]:
            return f"has {ident[2]} bytes, not the {recorded['bytes']} written"
        if _sha256(path) != recorded["sha256"]:
            return "fails its checksum (its bytes changed after it was written)"
    except FileNotFoundError:
        return "is missing"
    except OSError as err:
        return f"is unreadable ({err.strerror})"
    _VERIFIED.add(ident)
    return None


def _damaged_blocks(root: Path, manifest: dict[str, Any]) -> dict[int, str]:
    """The finished blocks whose files are missing, unreadable or fail their
    checksum, with why (every file is hashed, once per process)."""
    damaged = {}
    for block in manifest["done_blocks"]:
        why = _block_problem(root, manifest, block) or _checksum_problem(
            root / _block_file(block), _recorded(manifest, block)
        )
        if why is not None:
            damaged[block] = why
    return damaged


@dataclass
class Verification:
    """What :func:`verify_database` found."""

    root: Path
    files: int  # block files the manifest lists
    problems: dict[str, str] = field(default_factory=dict)  # file name -> why
    unchecked: int = 0  # readable files without a recorded checksum
    hashed_bytes: int = 0
    seconds: float = 0.0


def verify_database(root: Path, spec: DatabaseSpec | None = None) -> Verification:
    """Hash every block file of the database at ``root`` (of ``spec``, when given)
    and compare it with its recorded checksum; every file is read in full, also
    where no checksum was recorded (readability only, then)."""
    manifest = _read_manifest(root)
    if manifest is None:
        raise EvocompError(f"no variant database at {root}; run `evocomp database build`")
    if spec is not None:
        _check_same(root, manifest, spec)
    started = time.perf_counter()
    blocks = _blocks(manifest)
    report = Verification(root, len(blocks))
    done = set(manifest["done_blocks"])
    for block in blocks:
        name = _block_file(block)
        if block not in done:
            report.problems[name] = "is not built yet (the build did not finish)"
            continue
        why = _block_problem(root, manifest, block)
        recorded = _recorded(manifest, block)
        if why is None:
            path = root / name
            try:
                ident = _identity(path, "")
                sha256 = _sha256(path)
            except OSError as err:
                why = f"is unreadable ({err.strerror})"
            else:
                report.hashed_bytes += ident[2]
                if recorded is None:
                    report.unchecked += 1
                elif sha256 != recorded["sha256"]:
                    why = "fails its checksum (its bytes changed after it was written)"
                else:
                    _VERIFIED.add((*ident[:4], sha256))
        if why is not None:
            report.problems[name] = why
    report.seconds = time.perf_counter() - started
    return report


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
    gradients: dict[str, torch.Tensor] | None = None,
    compress: CompressUnits | None = None,
) -> bool:
    """Compute and store every variant in ``spec``, block by block.

    ``gradients`` (per-weight gradient norms by unit name) go to compressors that
    read them (:meth:`~.LayerCompressor.needs_gradients`). ``compress`` says where
    each block's linear units are compressed (default: in this process, one after
    another); this process always feeds the calibration inputs, accumulates the
    statistics and writes the block files. Width (sublayer-family) builds run here.
    ``on_block(b)`` is called once block ``b`` is finished, in block order.

    Resumes a partial build of the same spec; refuses a directory holding a
    database of another spec. Finished blocks whose files are missing, unreadable
    or fail their checksum are built again (only those). Returns False when the
    database was already complete and sound.
    Concurrent builders of one database (workers, sweep trials) take turns: the
    first builds, the others find it complete.
    """
    root.mkdir(parents=True, exist_ok=True)
    # A finished, sound database needs no lock: workers starting together hash
    # its files in parallel rather than one after another.
    manifest = _read_manifest(root)
    parts = COMPRESSORS.get(spec.compressor).parts
    if manifest is not None and manifest.get("complete"):
        _check_same(root, manifest, spec)
        if not _lacks_parts(manifest, parts) and not _damaged_blocks(root, manifest):
            return False
    with locked(root / ".lock"):
        return _build_database(
            model, units, spec, root, calibration, params=params, batch_size=batch_size,
            progress=progress, on_block=on_block, gradients=gradients,
            compress=compress or CompressHere(),
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
    gradients: dict[str, torch.Tensor] | None,
    compress: CompressUnits,
) -> bool:
    compressor_cls = COMPRESSORS.get(spec.compressor)
    manifest = _start_manifest(root, spec, units, compressor_cls.parts)
    # What the manifest lists is built: a database serving a subset of its levels
    # (see _check_same) rebuilds a damaged block with all of them.
    variants = {name: info["variants"] for name, info in manifest["units"].items()}
    by_block: dict[int, list[Unit]] = {}
    for u in units:
        if u.name in variants:
            by_block.setdefault(u.block, []).append(u)
    damaged = _damaged_blocks(root, manifest)
    done = set(manifest["done_blocks"]) - set(damaged)
    todo_blocks = [b for b in _blocks(manifest) if b not in done]
    _check_buildable(root, manifest, todo_blocks, by_block)
    if damaged:
        _forget(root, manifest, damaged)
    if manifest.get("complete"):
        return False
    path, blocks = find_blocks(model)
    if todo_blocks:
        # The calibration forward goes as far as the last block still to build.
        last = todo_blocks[-1]
        with torch.inference_mode():
            inputs = capture_block_inputs(model, calibration, batch_size)
            bar = tqdm(range(last + 1), desc="database", unit="block", disable=not progress)
            bar = blocks_on_device(model, blocks, bar)  # offloaded: one block on the device
            if compressor_cls.unit_family == "sublayer":
                batches = [Batch(hidden, kw) for hidden, kw in inputs]
                del inputs
                for b in bar:
                    todo = by_block.get(b, [])
                    write = b not in done and bool(todo)
                    if not write and not propagates(params):
                        todo = []  # finished, and the next inputs do not depend on it
                    built, batches = build_width_block(
                        model, path, b, blocks[b], todo, batches, params, variants, spec.through
                    )
                    if write:
                        _write_block(root, b, _width_tensors(model, built), manifest, done)
                    del built
                    if on_block is not None:
                        on_block(b)
            else:
                make = compressor_factory(compressor_cls, params, gradients)
                # Blocks forwarded but not yet finished: each one's tensors (None: no
                # file to write), being compressed while later blocks are forwarded.
                pending: deque[tuple[int, Callable[[], dict[str, torch.Tensor]] | None]] = (
                    deque()
                )

                def finish(keep: int) -> dict[str, torch.Tensor]:
                    """Write the pending blocks, oldest first, until ``keep`` are left;
                    the last one's tensors."""
                    tensors: dict[str, torch.Tensor] = {}
                    while len(pending) > keep:
                        block, wait = pending.popleft()
                        tensors = {} if wait is None else wait()
                        if wait is not None:
                            _write_block(root, block, tensors, manifest, done)
                        if on_block is not None:
                            on_block(block)
                    return tensors

                for b in bar:
                    todo = [] if b in done else by_block.get(b, [])
                    # With spec.through, the next block sees this one's start variants
                    # (no need for them after the last block built).
                    start = _starts(spec, by_block.get(b, [])) if b < last else {}
                    if todo or not start:
                        compressors = _attach(model, todo, make)
                        outputs = _forward_block(blocks[b], inputs, compressors)
                    if todo:
                        jobs = [
                            UnitJob(
                                u, compressors[u.name][0], tuple(variants[u.name]),
                                model.get_submodule(u.name).weight.dtype,
                            )
                            for u in todo
                        ]
                        pending.append((b, compress(jobs)))
                        del compressors, jobs  # free the statistics once compressed
                    else:
                        pending.append((b, None))
                    # Earlier blocks are written while this one is being compressed.
                    tensors = finish(compress.ahead)
                    if start and todo and pending:
                        # The next block's inputs go through this one's start variants:
                        # wait for them here, and write the block later.
                        _, wait = pending.pop()
                        assert wait is not None  # b has units to build
                        tensors = wait()
                        pending.append((b, _ready(tensors)))
                    if start:
                        # A finished block's start variants are read back as stored, so a
                        # resumed build propagates exactly what an uninterrupted one did.
                        weights = {
                            name: tensors[variant_name(name, key)]
                            if todo else _read_variant(root, b, name, key)
                            for name, key in start.items()
                        }
                        outputs = _forward_through(model, blocks[b], inputs, weights)
                    inputs = outputs
                    del tensors
                finish(0)
    manifest["complete"] = True
    _atomic_write_json(root / "manifest.json", manifest)
    return True


def _ready(tensors: dict[str, torch.Tensor]) -> Callable[[], dict[str, torch.Tensor]]:
    """A wait for ``tensors``, which are already here."""
    return lambda: tensors


def _forget(root: Path, manifest: dict[str, Any], damaged: dict[int, str]) -> None:
    """Take the finished blocks whose files are missing or corrupt (see
    :func:`_damaged_blocks`) off the manifest, so that the build redoes them."""
    for block, why in damaged.items():
        log.warning("database file %s %s; rebuilding it", root / _block_file(block), why)
    manifest["done_blocks"] = [b for b in manifest["done_blocks"] if b not in damaged]
    manifest["complete"] = False
    for block in damaged:
        manifest.get("checksums", {}).pop(_block_file(block), None)
        manifest.get("encodings", {}).pop(_block_file(block), None)
    _atomic_write_json(root / "manifest.json", manifest)


def _check_buildable(
    root: Path, manifest: dict[str, Any], todo: list[int], by_block: dict[int, list[Unit]]
) -> None:
    """Refuse to build a block without every unit the manifest puts in it (a config
    using a subset of a database's units cannot rebuild its damaged blocks)."""
    for block in todo:
        have = {u.name for u in by_block.get(block, [])}
        lacking = sorted(
            n for n, info in manifest["units"].items() if info["block"] == block and n not in have
        )
        if lacking:
            raise EvocompError(
                f"database file {root / _block_file(block)} must be rebuilt, but this config "
                f"lacks its unit {lacking[0]!r}; build with the config that made {root}, or "
                "delete it and build again"
            )


def _start_manifest(
    root: Path, spec: DatabaseSpec, units: Sequence[Unit], parts: Sequence[str] = ()
) -> dict[str, Any]:
    """The manifest of a build of ``spec`` at ``root``: the one there (refused if it is
    another spec's; it may already say ``complete``) or a new one, written at once."""
    manifest = _read_manifest(root)
    if manifest is not None:
        _check_same(root, manifest, spec)
        _check_storage(root, manifest)
        if _lacks_parts(manifest, parts):
            # Written before its compressor stored these parts (e.g. quantization
            # grids): the same weights are built again, now with every part.
            log.warning("database %s lacks the parts %s; rebuilding it", root, ", ".join(parts))
            for info in manifest["units"].values():
                info["parts"] = list(parts)
            manifest.update(done_blocks=[], checksums={}, encodings={}, complete=False)
            _atomic_write_json(root / "manifest.json", manifest)
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
            | ({"parts": list(parts)} if parts else {})
            for u in units
        },
        "done_blocks": [],
        "checksums": {},  # block file -> {"sha256", "bytes"} as written
        "storage": STORAGE_VERSION if _ENCODE else 1,
        "encodings": {},  # block file -> {stored name: encoding}, the weights not dense
        "complete": False,
    }
    _atomic_write_json(root / "manifest.json", manifest)
    return manifest


def _lacks_parts(manifest: dict[str, Any], parts: Sequence[str]) -> bool:
    """Whether some unit of the manifest was stored without one of ``parts``."""
    return any(
        set(parts) - set(info.get("parts", ())) for info in manifest["units"].values()
    )


def _forward_block(
    block: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]], compressors: _Attached
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Run ``block`` on every calibration batch (feeding the attached compressors) and
    return its outputs, the next block's inputs; the hooks are removed afterwards."""
    try:
        return [(first_output(block(hidden, **kw)), kw) for hidden, kw in inputs]
    finally:
        for _, handle in compressors.values():
            handle.remove()


def _starts(spec: DatabaseSpec, units: Sequence[Unit]) -> dict[str, VariantKey]:
    """The start variants (``spec.through``) of ``units``, by unit name."""
    through = spec.through or {}
    return {u.name: through[u.name] for u in units if u.name in through}


def _read_variant(root: Path, block: int, unit: str, key: VariantKey) -> torch.Tensor:
    """One stored weight of a finished (checked) block file, decoded."""
    # The manifest on disk was written with the block (see _write_block), so it
    # holds the block's encodings.
    manifest = _read_manifest(root) or {}
    with safe_open(str(root / _block_file(block)), framework="pt") as f:
        return _load(f, variant_name(unit, key), _encodings(manifest, block))


def _forward_through(
    model: nn.Module,
    block: nn.Module,
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    weights: dict[str, torch.Tensor],
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """``block``'s outputs with ``weights`` (stored layout, by unit name) in place of
    its units' weights, which are restored afterwards."""
    saved = []
    try:
        for name, w in weights.items():
            module = model.get_submodule(name)
            saved.append((module, module.weight.data))
            module.weight.data = w.to(device=module.weight.device, dtype=module.weight.dtype)
        return [(first_output(block(hidden, **kw)), kw) for hidden, kw in inputs]
    finally:
        for module, original in saved:
            module.weight.data = original


@dataclass(frozen=True)
class UnitJob:
    """One unit's share of a block's compression: its compressor, fed the block's
    calibration inputs (statistics such as the Hessian accumulated), and the variant
    keys to store. Pickles with that state, so workers can compress it elsewhere."""

    unit: Unit
    compressor: LayerCompressor
    keys: tuple[VariantKey, ...]
    dtype: torch.dtype  # the module weight's, which the stored weights take


def compress_unit(job: UnitJob) -> dict[str, torch.Tensor]:
    """Every variant of ``job``'s unit, by stored tensor name: in module layout (Conv1D
    transposed back), in the weight's dtype, contiguous, on the CPU. The one place a
    compressor's output becomes stored tensors, wherever a build runs it, so builds in
    process and on workers write the same bytes."""
    u, comp = job.unit, job.compressor
    tensors: dict[str, torch.Tensor] = {}
    # Sorted, so that a composite compressor sees every (zeros, bits) of one
    # zero count together and can reuse its pruned weight.
    for key in sorted(map(variant_key, job.keys), key=_order):
        w, parts = comp.compress_parts(key)
        tensors[variant_name(u.name, key)] = (
            (w.T if u.transposed else w).to(job.dtype).contiguous().cpu()
        )
        for part, t in parts.items():  # in the compressor's [out, in] layout
            tensors[variant_name(u.name, key, part)] = t.contiguous().cpu()
    return tensors


class CompressUnits(Protocol):
    """Where a build compresses each block's units (linear-family compressors): in
    this process (:class:`CompressHere`, the default) or on workers (e.g.
    ``evocomp.search.build.RayCompressUnits``). Each unit's tensors must be
    :func:`compress_unit`'s."""

    ahead: int
    """Blocks whose compression may still be running while the build feeds the next
    block's statistics (0: each block is compressed and written before the next is
    forwarded). Builds that propagate through a block's start variants wait for its
    tensors before the next block, but still write it that many blocks later."""

    def __call__(self, jobs: Sequence[UnitJob]) -> Callable[[], dict[str, torch.Tensor]]:
        """Start compressing one block's ``jobs``; the returned function waits for
        their tensors, by stored name, in the order of ``jobs``."""
        ...


class CompressHere:
    """:class:`CompressUnits` in this process, one unit after another, at once."""

    ahead = 0

    def __call__(self, jobs: Sequence[UnitJob]) -> Callable[[], dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        for job in jobs:
            tensors.update(compress_unit(job))
        return lambda: tensors


def _width_tensors(
    model: nn.Module, built: dict[str, dict[VariantKey, WidthVariant]]
) -> dict[str, torch.Tensor]:
    """One block's width variants by stored name: the output projection's refit weight
    (in the model's dtype) and the kept indices (part ``kept``)."""
    dtype = next(model.parameters()).dtype
    tensors = {}
    for unit, variants in built.items():
        for key, v in variants.items():
            tensors[variant_name(unit, key)] = v.weight.to(dtype).contiguous()
            tensors[variant_name(unit, key, KEPT)] = v.kept
    return tensors


def _write_block(
    root: Path, block: int, tensors: dict[str, torch.Tensor], manifest: dict[str, Any],
    done: set[int],
) -> None:
    """Write ``block``'s file atomically, then record the block as done, with the
    file's size and SHA-256 (in ``done`` and in the manifest on disk)."""
    name = _block_file(block)
    tmp = root / (name + ".tmp")
    encodings: dict[str, dict[str, Any]] = {}
    if _ENCODE:
        tensors, encodings = _encode_block(tensors, _variant_names(manifest, block, parts=False))
    # save_file writes the tensors in place (safetensors.torch.save would first
    # copy them into one bytes object); the hash then reads the file back from
    # the page cache it was just written to.
    save_file(tensors, str(tmp))
    sha256 = _sha256(tmp)
    os.replace(tmp, root / name)
    ident = _identity(root / name, sha256)
    _VERIFIED.add(ident)
    manifest.setdefault("checksums", {})[name] = {"sha256": sha256, "bytes": ident[2]}
    manifest.setdefault("encodings", {})[name] = encodings
    if encodings:
        manifest["storage"] = STORAGE_VERSION
    manifest["done_blocks"] = sorted(done | {block})
    done.add(block)
    _atomic_write_json(root / "manifest.json", manifest)


MakeCompressor: TypeAlias = Callable[[Unit, torch.Tensor], LayerCompressor]
"""Builds a unit's compressor from its weight (``[out, in]`` layout)."""


def compressor_factory(
    cls: type[LayerCompressor], params: Any, gradients: dict[str, torch.Tensor] | None = None
) -> MakeCompressor:
    """``cls(weight, params)`` per unit, handed the unit's gradient norms first when
    it reads them (:meth:`~.LayerCompressor.needs_gradients`)."""
    reads = cls.needs_gradients(params)
    if reads and gradients is None:
        raise EvocompError(f"{cls.__name__} reads gradients, but none were given")

    def make(u: Unit, weight: torch.Tensor) -> LayerCompressor:
        comp = cls(weight, params)
        if reads:
            assert gradients is not None
            comp.add_gradient(gradients[u.name])
        return comp

    return make


def unit_weight(model: nn.Module, u: Unit) -> torch.Tensor:
    """``u``'s weight in ``[out, in]`` layout (GPT-2's Conv1D transposed), detached."""
    weight = model.get_submodule(u.name).weight.detach()
    return weight.T if u.transposed else weight


def _attach(model: nn.Module, units: Iterable[Unit], make: MakeCompressor) -> _Attached:
    """A compressor per unit (``make``), fed the unit's inputs by a forward hook."""
    attached = {}
    for u in units:
        comp = make(u, unit_weight(model, u))

        def feed(_m: nn.Module, args: tuple, _out: Any, comp: LayerCompressor = comp) -> None:
            comp.add_batch(args[0])

        attached[u.name] = (comp, model.get_submodule(u.name).register_forward_hook(feed))
    return attached
