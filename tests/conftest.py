"""Shared fixtures: tiny random Llama-style models and a byte-level tokenizer,
built in memory so the suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evocomp.spaces.metric import ARITY, SYMBOLS, Expr

# Tiny models gain nothing from intra-op threads, and two OpenMP threads on a busy
# 2-core machine turn microsecond ops into tens of milliseconds.
torch.set_num_threads(1)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real (if trivial) tokenizer: one token per byte (ids 0-255), then BOS/EOS (256, 257)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(
    *, layers: int = 4, hidden: int = 64, intermediate: int = 128, vocab: int = 258, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised Llama with GQA (4 heads, 2 KV heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model


def random_weight(seed: int = 0, rows: int = 24, cols: int = 72) -> torch.Tensor:
    """A Gaussian weight matrix for per-layer compressor tests."""
    torch.manual_seed(seed)
    return torch.randn(rows, cols)


def correlated_inputs(
    tokens: int = 1024, cols: int = 72, outliers: int = 4, seed: int = 1
) -> torch.Tensor:
    """LLM-like activations: low-rank correlated columns plus a few large-scale ones."""
    gen = torch.Generator().manual_seed(seed)
    mix = (
        0.3 * torch.eye(cols)
        + torch.randn(cols, 8, generator=gen) @ torch.randn(8, cols, generator=gen) / 3
    )
    x = torch.randn(tokens, cols, generator=gen) @ mix
    x[:, torch.arange(outliers) * (cols // outliers) + 1] *= 10  # scattered, as in real LLMs
    return x


def random_expr(rng: random.Random, depth: int) -> Expr:
    """A random metric expression at most ``depth`` deep."""
    leaves = [s for s in SYMBOLS if ARITY[s] == 0]
    if depth == 0 or rng.random() < 0.25:
        return Expr(rng.choice(leaves))
    op = rng.choice([s for s in SYMBOLS if ARITY[s]])
    return Expr(op, tuple(random_expr(rng, depth - 1) for _ in range(ARITY[op])))


def uneven_llama(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose blocks differ in sensitivity: the first blocks write
    strongly into the residual stream, the last ones barely, so pruning the first
    blocks costs far more than pruning the last."""
    model = tiny_llama(seed=seed)
    scales = [3.0, 2.0, 0.5, 0.2]
    with torch.no_grad():
        for block, scale in zip(model.model.layers, scales, strict=True):
            block.self_attn.o_proj.weight.mul_(scale)
            block.mlp.down_proj.weight.mul_(scale)
        model.lm_head.weight.mul_(20.0)  # sharper next-token distributions
    return model


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


def _saved(model: LlamaForCausalLM, out: Path) -> Path:
    """Save ``model`` with the byte tokenizer as a plain Hugging Face directory."""
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    return _saved(tiny_llama(), tmp_path / "tiny-llama")


@pytest.fixture
def uneven_model_dir(tmp_path: Path) -> Path:
    return _saved(uneven_llama(), tmp_path / "uneven-llama")


# -- end-to-end helpers -----------------------------------------------------------


def search_config(tmp_path, model_dir, name="tiny", **sections) -> str:
    """A tiny-model search config written to ``tmp_path``; ``sections`` override
    the defaults (a section naming a component replaces the default one)."""
    cfg = {
        "name": name,
        "run_dir": str(tmp_path / "runs" / name),
        "model": {"name": str(model_dir)},
        "data": {"corpus": "wiki", "seq_len": 64, "calibration": 8, "search": 4, "heldout": 8},
        "compressor": {"name": "sparsegpt"},
        "space": {"name": "sparsity", "target": 0.5, "step": 0.1, "levels": 2},
        "search": {
            "name": "evopress",
            "generations": 4,
            "offspring": 4,
            "stages": [{"tokens": 64, "keep": 2}, {"tokens": 256, "keep": 1}],
        },
        "database": {"path": str(tmp_path / "db")},
    }
    for key, value in sections.items():
        # A section naming a (new) component replaces the default one wholesale.
        merge = isinstance(value, dict) and "name" not in value
        cfg[key] = {**cfg.get(key, {}), **value} if merge else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def exported_model(
    run: Path, out: Path, fmt: str = "hf"
) -> tuple[LlamaForCausalLM, list[dict[str, Any]]]:
    """``evocomp export --format fmt`` of ``run`` to ``out``, reloaded with plain
    transformers; the reload must reproduce the run's held-out perplexity. Returns
    the model and the per-layer rows of ``evocomp.json``."""
    from transformers import AutoModelForCausalLM

    from evocomp import runner
    from evocomp.cli import main
    from evocomp.evaluators import PerplexityEvaluator

    assert main(["-q", "export", str(run), "--out", str(out), "--format", fmt]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg, _ = runner.load_run_config(run)
    heldout = runner.Experiment(cfg, progress=False).splits.heldout
    searched = json.loads((run / "eval.json").read_text())["ppl"]["searched"]
    assert PerplexityEvaluator(heldout).evaluate(model)["ppl"] == pytest.approx(searched, rel=1e-5)
    return model, json.loads((out / "evocomp.json").read_text())["layers"]


# -- a real PostgreSQL server for shared trial stores --------------------------------


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """An SQLAlchemy URL of an empty PostgreSQL database: ``$EVOCOMP_TEST_POSTGRES``,
    else a throwaway server started here from the installed binaries (``.ci/run``
    installs them). Skipped when neither exists, unless ``EVOCOMP_REQUIRE_POSTGRES``
    is set (as in CI), where that is a failure."""
    if url := os.environ.get("EVOCOMP_TEST_POSTGRES"):
        yield url
        return
    bindir = _postgres_bin()
    if bindir is None:
        if os.environ.get("EVOCOMP_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is required here but initdb was not found")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    # PostgreSQL refuses to run as root: as root, the server runs as user postgres
    # in a directory it owns (outside pytest's root-only tmp dirs).
    root = Path(tempfile.mkdtemp(prefix="evocomp-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "data", root / "server.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = partial(subprocess.run, check=True, capture_output=True)
    run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"])
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w",
         "start"])
    try:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE evocomp")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/evocomp"
    finally:
        run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new empty database on the test server, so each test has its own study."""
    import psycopg

    base, _, _ = server_url.rpartition("/")
    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{base}/{name}"


def stored_tensors(root: Path) -> dict[tuple[str, str], torch.Tensor]:
    """Every tensor of the variant database at ``root``, by block file and name."""
    out = {}
    for path in sorted(root.glob("block_*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            out.update({(path.name, k): f.get_tensor(k).clone() for k in names})
    return out


def block_stamps(root: Path) -> dict[str, tuple[int, int]]:
    """Inode and mtime of each block file at ``root``: unchanged when not rewritten."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.glob("block_*.safetensors")
    }


def flip_bytes(path: Path, count: int = 16) -> None:
    """XOR ``count`` bytes in the middle of a safetensors file's tensor data, so the
    file keeps its size and a readable header."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    middle = start + (len(data) - start) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def tiny_spec(model, compressor: str, params, variants, through=None):
    """The :class:`~evocomp.supernet.database.DatabaseSpec` of a test database:
    ``compressor`` with ``params`` on ``model``, a fixed calibration name, float32."""
    from evocomp.supernet.database import DatabaseSpec
    from evocomp.supernet.models import model_fingerprint

    return DatabaseSpec(
        model_fingerprint=model_fingerprint(model),
        compressor=compressor,
        compressor_params=params.model_dump(mode="json"),
        calibration_fingerprint="calib-0",
        dtype="float32",
        variants=variants,
        through=through,
    )
