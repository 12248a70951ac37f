"""The variant database mends itself, end to end through the ``evocomp`` command:
flipped bytes are reported (``database verify``) and rebuilt bit for bit,
truncated and deleted block files are rebuilt (no advice that loops), and a
build killed with SIGKILL resumes where it stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    block_stamps,
    byte_tokenizer,
    flip_bytes,
    search_config,
    stored_tensors,
    tiny_llama,
)

from evocomp.cli import main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOCOMP_CACHE", str(tmp_path / "cache"))




def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k






def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_flipped_bytes_are_reported_and_a_build_restores_them(tmp_path, tiny_model_dir, capsys):
    cfg = search_config(tmp_path, tiny_model_dir)
    db = tmp_path / "db"
    assert main(["-q", "database", "build", cfg]) == 0
    capsys.readouterr()
    assert main(["-q", "database", "verify", cfg]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{db}: 4 block files, ")
    assert out[0].endswith("; 4 match their checksums")
    original = stored_tensors(db)

    flip_bytes(db / "block_001.safetensors")
    assert main(["-q", "database", "verify", cfg, "--set", "seed=0"]) == 2
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0] == f"{db / 'block_001.safetensors'} fails its checksum (its bytes changed " \
        "after it was written)"
    assert "3 match their checksums, 1 missing or corrupt" in lines[1] and len(lines) == 2
    err = [line for line in captured.err.splitlines() if line.startswith("evocomp:")]
    assert len(err) == 1 and "1 of 4 block files" in err[0] and "(block_001.safetensors)" in err[0]
    assert f"`evocomp database build {cfg} --set seed=0` rebuilds them" in err[0]

    assert main(["-q", "database", "build", cfg]) == 0
    assert main(["-q", "database", "verify", cfg]) == 0
    _assert_same(stored_tensors(db), original)
    assert main(["-q", "search", cfg, "--no-eval", "--set", "search.generations=1"]) == 0


def test_truncated_and_deleted_blocks_are_rebuilt_and_the_search_runs(
    tmp_path, tiny_model_dir, capsys
):
    cfg = search_config(tmp_path, tiny_model_dir)
    db = tmp_path / "db"
    assert main(["-q", "database", "build", cfg]) == 0
    original, stamps = stored_tensors(db), block_stamps(db)
    path = db / "block_000.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    (db / "block_003.safetensors").unlink()
    capsys.readouterr()

    assert main(["-q", "database", "verify", cfg]) == 2
    captured = capsys.readouterr()
    assert f"{db / 'block_000.safetensors'} has 1000 bytes, not the" in captured.out
    assert f"{db / 'block_003.safetensors'} is missing" in captured.out
    assert "(block_000.safetensors, block_003.safetensors)" in captured.err

    assert main(["-q", "database", "build", cfg]) == 0
    after = block_stamps(db)
    assert {n for n in after if after[n] != stamps.get(n)} == {
        "block_000.safetensors", "block_003.safetensors"
    }
    _assert_same(stored_tensors(db), original)
    assert main(["-q", "database", "build", cfg]) == 0  # nothing left to do
    assert block_stamps(db) == after
    assert main(["-q", "search", cfg, "--no-eval", "--set", "search.generations=1"]) == 0


def test_verify_says_when_a_database_has_no_checksums(tmp_path, tiny_model_dir, capsys):
    cfg = search_config(tmp_path, tiny_model_dir)
    db = tmp_path / "db"
    assert main(["-q", "database", "build", cfg]) == 0
    manifest = _manifest(db)
    del manifest["checksums"]  # as written before checksums were recorded
    (db / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["-q", "database", "verify", cfg]) == 0
    assert capsys.readouterr().out.strip().endswith(
        "; 0 match their checksums, 4 readable but with no checksums (built before checksums "
        "were recorded)"
    )


LAYERS = 8


def test_a_build_killed_with_sigkill_resumes_and_equals_an_uninterrupted_one(tmp_path):
    """A real ``evocomp database build`` process, SIGKILLed once the manifest lists
    some finished blocks, then run again: it keeps the finished blocks' files and
    its database equals that of a build never interrupted, bit for bit."""
    model_dir = tmp_path / "deep-llama"
    # Wide enough that a block takes ~0.3 s to compress (real work, no hook): the
    # test polls every 2 ms, so it kills the build between its first and last block.
    tiny_llama(layers=LAYERS, hidden=128, intermediate=256).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    cfg = search_config(tmp_path, model_dir)
    db = tmp_path / "db"
    # One thread, as in this process (conftest): the same float rounding everywhere.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    build = [sys.executable, "-m", "evocomp.cli", "-q", "database", "build", cfg]

    proc = subprocess.Popen(build, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if _manifest(db)["done_blocks"]:
                    break
            except FileNotFoundError:
                pass
            assert time.monotonic() < deadline, "no block finished in 10 minutes"
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    killed = _manifest(db)
    before = killed["done_blocks"]
    assert not killed["complete"] and 1 <= len(before) < LAYERS, before
    assert before == list(range(len(before)))
    assert sorted(killed["checksums"]) == [f"block_{b:03d}.safetensors" for b in before]
    stamps = block_stamps(db)
    assert set(stamps) >= {f"block_{b:03d}.safetensors" for b in before}

    assert main(["-q", "database", "verify", cfg]) == 2  # unfinished: not built yet
    assert main(["-q", "database", "build", cfg]) == 0  # here: a second start-up costs ~10 s
    resumed = _manifest(db)
    assert resumed["complete"] and resumed["done_blocks"] == list(range(LAYERS))
    after = block_stamps(db)
    kept = {n for n in stamps if after[n] == stamps[n]}
    rebuilt = {n for n in after if after[n] != stamps.get(n)}
    assert kept == {f"block_{b:03d}.safetensors" for b in before}
    assert len(kept) + len(rebuilt) == LAYERS and len(rebuilt) == LAYERS - len(before)
    assert not list(db.glob("*.tmp"))
    print(f"killed after {len(before)} of {LAYERS} blocks; the rerun built {len(rebuilt)}")

    reference = tmp_path / "reference"
    assert main(["-q", "database", "build", cfg, "--set", f"database.path={reference}"]) == 0
    assert _manifest(reference)["checksums"] == resumed["checksums"]  # the very same bytes
    _assert_same(stored_tensors(db), stored_tensors(reference))
