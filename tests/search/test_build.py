"""Variant database builds with units compressed elsewhere: pickled jobs, deferred
compression, and Ray workers (one local Ray with 2 CPUs for the whole module)."""

import json
import pickle
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from conftest import search_config, tiny_spec

from evocomp.config import load_config
from evocomp.errors import EvocompError
from evocomp.runner import Experiment
from evocomp.search.build import RayCompressUnits
from evocomp.search.executor import EXECUTORS, RayExecutor, start_ray
from evocomp.supernet import database
from evocomp.supernet.compressors import COMPRESSORS
from evocomp.supernet.database import (
    CompressHere,
    UnitJob,
    build_database,
    compress_unit,
    open_database,
)
from evocomp.supernet.units import find_linear_units

LEVELS = {
    "sparsegpt": lambda u: [u.numel * 3 // 10, u.numel // 2, u.numel * 7 // 10],
    "gptq": lambda u: [2, 3, 4],
}


def _calibration() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _setup(model, compressor: str):
    units = find_linear_units(model)
    cls = COMPRESSORS.get(compressor)
    params = cls.Params()
    variants = {u.name: LEVELS[compressor](u) for u in units}
    through = None
    if cls.needs_start(params):  # sparsegpt: the next block's inputs go through these
        through = {name: levels[1] for name, levels in variants.items()}
    spec = tiny_spec(model, compressor, params, variants, through=through)
    return units, spec, params


def _build(model, compressor, root, compress=None, on_block=None) -> dict[str, str]:
    units, spec, params = _setup(model, compressor)
    build_database(model, units, spec, root, _calibration(), params=params, progress=False,
                   compress=compress, on_block=on_block)
    return _checksums(root)


def _checksums(root) -> dict[str, str]:
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["complete"]
    sums = {name: c["sha256"] for name, c in manifest["checksums"].items()}
    assert sums == {p.name: database._sha256(p) for p in root.glob("block_*.safetensors")}
    return sums


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> Callable[[str], dict[str, str]]:
    """The one-process build of each compressor's database (built once)."""
    built: dict[str, dict[str, str]] = {}

    def get(compressor: str) -> dict[str, str]:
        if compressor not in built:
            from conftest import tiny_llama

            root = tmp_path_factory.mktemp(f"here-{compressor}")
            built[compressor] = _build(tiny_llama(), compressor, root)
        return built[compressor]

    return get


# -- without Ray ------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in COMPRESSORS.names()
                                  if COMPRESSORS.get(n).unit_family == "linear"])
def test_jobs_pickle_with_their_statistics(name, tiny_model):
    """What a worker unpickles compresses to the same tensors as the original."""
    unit = next(u for u in find_linear_units(tiny_model) if u.name.endswith("mlp.down_proj"))
    cls = COMPRESSORS.get(name)
    params = cls.Params()
    make = database.compressor_factory(cls, params, {unit.name: torch.rand(unit.shape)})
    comp = make(unit, database.unit_weight(tiny_model, unit))
    comp.add_batch(torch.randn(2, 16, unit.shape[1], generator=torch.Generator().manual_seed(1)))
    half = unit.numel // 2
    keys = {"sparsity": (half,), "bits": (3,), "sparsity+bits": ((half, 3),), "gguf": (2,)}
    job = UnitJob(unit, comp, keys[cls.kind], torch.float32)
    copy = pickle.loads(pickle.dumps(job))
    want, got = compress_unit(job), compress_unit(copy)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


class Deferred:
    """Compresses a block only when its tensors are awaited, up to two blocks late."""

    ahead = 2

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, jobs: Sequence[UnitJob]) -> Callable[[], dict[str, torch.Tensor]]:
        self.calls += 1
        return lambda: CompressHere()(jobs)()


@pytest.mark.parametrize("compressor", ["sparsegpt", "gptq"])
def test_compressing_later_writes_the_same_bytes(compressor, tiny_model, tmp_path, in_process):
    finished: list[int] = []
    compress = Deferred()
    assert _build(tiny_model, compressor, tmp_path, compress, finished.append) == in_process(
        compressor
    )
    assert finished == [0, 1, 2, 3] and compress.calls == 4


def test_executors_say_where_units_are_compressed():
    with EXECUTORS.get("local").compress_units(EXECUTORS.get("local").Params()) as compress:
        assert compress is None
    params = RayExecutor.Params(num_workers=3, threads_per_worker=2)
    with RayExecutor.compress_units(params) as compress:
        assert isinstance(compress, RayCompressUnits) and compress.params is params


# -- on Ray -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_2cpus() -> Iterator[None]:
    """One local Ray with 2 CPUs for every test here (~5-10 s to start on 2 cores)."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    start_ray(None, who="tests", num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def on_ray(ray_2cpus) -> Iterator[RayCompressUnits]:
    params = RayExecutor.Params(num_workers=2, cpus_per_worker=1, threads_per_worker=1)
    with RayCompressUnits(params) as compress:
        yield compress


@pytest.mark.parametrize("compressor", ["sparsegpt", "gptq"])
def test_ray_build_writes_the_bytes_of_a_one_process_build(
    compressor, tiny_model, tmp_path, in_process, on_ray, monkeypatch
):
    """Byte for byte: the workers run compress_unit on one torch thread, like this
    process (conftest). sparsegpt waits for each block (its start variants feed the
    next); gptq compresses a block while the next is forwarded."""
    want = in_process(compressor)
    monkeypatch.setattr(database, "compress_unit", None)  # nothing compressed here
    assert _build(tiny_model, compressor, tmp_path, on_ray) == want


def test_interrupted_ray_build_resumes(tiny_model, tmp_path, in_process, on_ray):
    def crash_after_block_1(block: int) -> None:
        if block == 1:
            raise KeyboardInterrupt

    units, spec, params = _setup(tiny_model, "gptq")
    with pytest.raises(KeyboardInterrupt):
        build_database(tiny_model, units, spec, tmp_path, _calibration(), params=params,
                       progress=False, compress=on_ray, on_block=crash_after_block_1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # Block 2 was being compressed when the build stopped: it is not recorded.
    assert manifest["done_blocks"] == [0, 1] and not manifest["complete"]
    assert not (tmp_path / "block_002.safetensors").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("block_*.safetensors")}
    assert _build(tiny_model, "gptq", tmp_path, on_ray) == in_process("gptq")
    assert all(tmp_path.joinpath(n).stat().st_mtime_ns == t for n, t in stamps.items())


def test_a_failing_task_raises_its_error_here(tiny_model, on_ray):
    unit = find_linear_units(tiny_model)[0]
    comp = COMPRESSORS.get("gptq")(database.unit_weight(tiny_model, unit))
    comp.add_batch(torch.randn(4, unit.shape[1]))
    wait = on_ray([UnitJob(unit, comp, (3, 99), torch.float32)])
    with pytest.raises(EvocompError, match="bitwidth 99 is outside"):
        wait()


def test_experiment_with_executor_ray_builds_on_ray(
    tmp_path, tiny_model_dir, ray_2cpus, monkeypatch
):
    """The runner hands the executor's compress function to the build; actors that
    open the finished database (and a local run) get the same files."""
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))
    ray_cfg = load_config(search_config(tmp_path, tiny_model_dir, name="on-ray",
                                        database={"path": str(tmp_path / "db-ray")},
                                        executor={"name": "ray", "num_workers": 2}))
    local_cfg = load_config(search_config(tmp_path, tiny_model_dir, name="here"))

    def refuse(*_):
        raise AssertionError("compressed in process")

    with monkeypatch.context() as m:
        m.setattr(CompressHere, "__call__", refuse)
        ray_db = Experiment(ray_cfg, progress=False).database
    here_db = Experiment(local_cfg, progress=False).database
    assert ray_db is not None and here_db is not None
    assert _checksums(ray_db.root) == _checksums(here_db.root)
    open_database(ray_db.root, Experiment(ray_cfg, progress=False).database_spec())
