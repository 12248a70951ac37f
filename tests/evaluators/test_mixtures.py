"""Tests for corpus mixtures (evocomp.evaluators.data): the config syntax, splits
drawn from every part in proportion, and dense references cached per part."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from evocomp.errors import EvocompError
from evocomp.evaluators.data import (
    CORPORA,
    SPLITS,
    DataConfig,
    NotEnoughText,
    apportion,
    interleave,
    load_splits,
    split_tokens,
    training_tokens,
)
from evocomp.evaluators.metrics import KLEvaluator, KLEvaluatorParams
from evocomp.evaluators.reference import ReferenceCache, compute_reference


@pytest.fixture
def numbered(tmp_path: Path) -> Path:
    """A local corpus whose every document carries a unique ``#<n>`` mark."""
    path = tmp_path / "numbered.txt"
    docs = [f"Document #{i} holds the value {i * 13} and nothing else." for i in range(400)]
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


def _mixed(path: Path, **kw: object) -> DataConfig:
    sizes = {"seq_len": 32, "calibration": 6, "search": 5, "heldout": 3, **kw}
    return DataConfig(corpus={"text": 1, "books": 2}, path=str(path), **sizes)


def test_plain_corpus_stays_a_string() -> None:
    for spelled in ("wiki", ["wiki"], {"wiki": 0.3}):
        cfg = DataConfig(corpus=spelled)
        assert cfg.corpus == "wiki" and cfg.model_dump()["corpus"] == "wiki"
        assert cfg.parts == {"wiki": 1.0} and cfg.name == "wiki"


def test_mixture_weights_are_normalised_in_name_order() -> None:
    cfg = DataConfig(corpus={"wiki": 1, "books": 3})
    assert cfg.corpus == {"books": 0.75, "wiki": 0.25} and list(cfg.corpus) == ["books", "wiki"]
    assert cfg.name == "books+wiki"
    assert DataConfig(corpus=["wiki", "books"]).corpus == {"books": 0.5, "wiki": 0.5}
    assert DataConfig(corpus={"wiki": 0.5, "books": 0.5}) == DataConfig(corpus=["books", "wiki"])


@pytest.mark.parametrize(
    ("corpus", "message"),
    [
        ({"wiki": 0.5, "nope": 0.5}, r"unknown corpus 'nope'; allowed: .*'books'.*'wiki'"),
        ({"wiki": -1, "books": 1}, r"weight of corpus 'wiki' must be a number > 0, got -1"),
        ({"wiki": 0, "books": 1}, r"weight of corpus 'wiki' must be a number > 0, got 0"),
        ({"wiki": math.nan, "books": 1}, r"must be a number > 0, got nan"),
        ({"wiki": True, "books": 1}, r"must be a number > 0, got True"),
        ({"wiki": "half", "books": 1}, r"must be a number > 0, got 'half'"),
        ({}, r"needs at least one corpus; allowed: .*'wiki'"),
        ([], r"needs at least one corpus; allowed: .*'wiki'"),
        (["wiki", "nope"], r"unknown corpus 'nope'; allowed"),
        (["wiki", "wiki"], r"'wiki' is listed twice"),
        (["wiki", 3], r"list of corpus names .*allowed: .*'wiki'"),
        (3, r"a corpus name, a list of names or a mapping .*allowed: .*'wiki'"),
    ],
)
def test_bad_mixtures_are_refused(corpus: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as err:
        DataConfig(corpus=corpus)
    assert err.value.errors()[0]["loc"] == ("corpus",)


def test_bad_mixture_is_one_line_naming_the_field() -> None:
    from evocomp.config import load_config

    with pytest.raises(EvocompError) as err:
        load_config(None, ["data.corpus={wiki: 0.5, nope: 0.5}"])
    assert "\n" not in str(err.value)
    assert re.search(r"data\.corpus: unknown corpus 'nope'; allowed: .*'code'", str(err.value))


def test_path_belongs_to_the_text_part(numbered: Path) -> None:
    assert _mixed(numbered).parts == {"books": 2 / 3, "text": 1 / 3}
    with pytest.raises(ValidationError, match="corpus 'text' needs path"):
        DataConfig(corpus=["text", "books"])
    with pytest.raises(ValidationError, match="mixture 'books\\+wiki' does not include"):
        DataConfig(corpus=["wiki", "books"], path=str(numbered))
    alone = _mixed(numbered).alone("books")
    assert alone.corpus == "books" and alone.path is None and alone.seq_len == 32
    assert _mixed(numbered).alone("text").path == str(numbered)


def test_apportion_by_largest_remainder() -> None:
    assert apportion(16, {"books": 0.5, "wiki": 0.5}) == {"books": 8, "wiki": 8}
    assert apportion(5, {"books": 0.5, "wiki": 0.5}) == {"books": 3, "wiki": 2}  # tie: first
    assert apportion(10, {"a": 0.45, "b": 0.35, "c": 0.2}) == {"a": 5, "b": 3, "c": 2}
    assert apportion(7, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == {"a": 3, "b": 2, "c": 2}
    assert apportion(1, {"a": 0.1, "b": 0.9}) == {"a": 0, "b": 1}
    for n in range(40):
        for weights in ({"a": 0.2, "b": 0.8}, {"a": 0.15, "b": 0.6, "c": 0.25}):
            counts = apportion(n, weights)
            assert sum(counts.values()) == n
            assert all(abs(counts[k] - n * w) < 1 for k, w in weights.items())


def test_interleave_keeps_every_prefix_in_proportion() -> None:
    assert interleave({"books": 2, "wiki": 2}) == ["books", "wiki", "books", "wiki"]
    counts = {"a": 3, "b": 6, "c": 1}
    order = interleave(counts)
    assert {k: order.count(k) for k in counts} == counts
    for i in range(1, len(order) + 1):
        for k, c in counts.items():
            assert abs(order[:i].count(k) - i * c / 10) < 1


def test_mixture_splits_in_proportion(numbered: Path, tokenizer) -> None:
    cfg = _mixed(numbered)
    splits = load_splits(cfg, tokenizer)
    again = load_splits(cfg, tokenizer)
    for name in SPLITS:
        n = getattr(cfg, name)
        tokens = getattr(splits, name)
        assert tokens.shape == (n, 32) and torch.equal(tokens, getattr(again, name))
        assert splits.fingerprint(name) == again.fingerprint(name)
        sources = splits.sources[name]
        assert {c: sources.count(c) for c in cfg.parts} == apportion(n, cfg.parts)
        assert sources == tuple(interleave(apportion(n, cfg.parts)))
        assert split_tokens(cfg, name, tokenizer).equal(tokens)
    # The first rows (what a small token budget scores) hold both corpora.
    assert set(splits.sources["search"][:2]) == {"books", "text"}


def test_each_part_is_its_corpus_alone(numbered: Path, tokenizer) -> None:
    cfg = _mixed(numbered)
    splits = load_splits(cfg, tokenizer)
    for name in SPLITS:
        for block in splits.blocks(name):
            # A run on that corpus alone, with as many sequences, gets these very rows.
            alone = cfg.alone(block.corpus).model_copy(update={name: len(block.rows)})
            tokens = split_tokens(alone, name, tokenizer)
            assert torch.equal(getattr(splits, name)[list(block.rows)], tokens)
            assert block.fingerprint == load_splits(alone, tokenizer).fingerprint(name)


def test_mixture_splits_are_disjoint(numbered: Path, tokenizer) -> None:
    splits = load_splits(_mixed(numbered, calibration=12, search=9, heldout=9), tokenizer)
    marks = {}
    for name in SPLITS:
        text = tokenizer.decode(getattr(splits, name).flatten())
        marks[name] = set(re.findall(r"#(\d+) holds", text))
        assert marks[name], name
        rows = {tuple(r) for r in getattr(splits, name).tolist()}
        for other in SPLITS:
            if other != name:
                assert not rows & {tuple(r) for r in getattr(splits, other).tolist()}
    assert not marks["calibration"] & marks["search"]
    assert not marks["calibration"] & marks["heldout"]
    assert not marks["search"] & marks["heldout"]


def test_plain_corpus_has_one_block_with_its_fingerprint(numbered: Path, tokenizer) -> None:
    splits = load_splits(DataConfig(corpus="text", path=str(numbered), seq_len=32), tokenizer)
    (block,) = splits.blocks("search")
    assert block.corpus == "text" and block.rows == tuple(range(8))
    assert block.fingerprint == splits.fingerprint("search")


def test_too_little_text_names_the_part(tmp_path: Path, tokenizer) -> None:
    small = tmp_path / "small.txt"
    small.write_text("A few words.\n\nAnd a few more.", encoding="utf-8")
    where = r"split of corpus 'text' .* of the mixture 'books\+text'"
    with pytest.raises(EvocompError, match=where):
        load_splits(_mixed(small), tokenizer)


def test_training_tokens_of_a_mixture(numbered: Path, tokenizer) -> None:
    cfg = _mixed(numbered)
    tokens = training_tokens(cfg, tokenizer, 9 * 32)
    assert tokens.shape == (9, 32)
    cal = load_splits(cfg, tokenizer)
    # Each part's share starts with that part's calibration sequences.
    for block in cal.blocks("calibration"):
        rows = [r for r, c in enumerate(interleave(apportion(9, cfg.parts))) if c == block.corpus]
        first = tokens[rows][: len(block.rows)]
        assert torch.equal(first, cal.calibration[list(block.rows)])
    with pytest.raises(NotEnoughText, match="mixture 'books\\+text'") as err:
        training_tokens(cfg, tokenizer, 10**6 * 32)
    most = err.value.available
    assert 0 < most < 10**6 * 32
    assert training_tokens(cfg, tokenizer, most).numel() == most


def test_references_are_cached_per_part(numbered: Path, tokenizer, tiny_model, tmp_path) -> None:
    cfg = _mixed(numbered)
    splits = load_splits(cfg, tokenizer)
    root = tmp_path / "references"
    blocks = splits.blocks("search")
    cache = ReferenceCache(root, "model", splits.fingerprint("search"), blocks)
    ref = cache.reference(tiny_model, splits.search, progress=False)
    whole = compute_reference(tiny_model, splits.search, progress=False)
    assert torch.allclose(ref.probs, whole.probs, atol=1e-6)
    assert ref.neg_entropy is not None and whole.neg_entropy is not None
    assert torch.allclose(ref.neg_entropy, whole.neg_entropy, atol=1e-5)
    # One file per part, each the one a run on that corpus alone uses.
    assert len(list(root.glob("*.safetensors"))) == len(blocks) == 2
    for block in blocks:
        alone = cfg.alone(block.corpus).model_copy(update={"search": len(block.rows)})
        plain = ReferenceCache(root, "model", load_splits(alone, tokenizer).fingerprint("search"))
        assert plain.path(None).exists()
    # Top-k references too, and the KL evaluator reads them through the cache.
    ev = KLEvaluator.create(tiny_model, splits.search, KLEvaluatorParams(topk=5), cache=cache,
                            progress=False)
    assert ev.reference.indices is not None and ev.reference.indices.shape == (5, 32, 5)
    assert ev.evaluate(tiny_model)["kl"] == pytest.approx(0.0, abs=1e-5)
    assert len(list(root.glob("*.safetensors"))) == 4


def test_registered_corpora_include_the_packaged_ones() -> None:
    assert {"wiki", "books", "code", "coqa", "papers", "math"} <= set(CORPORA.names())
