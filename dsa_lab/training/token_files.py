"""Hub-scale token files: a corpus too big for memory is tokenised once, in parallel worker processes, into
memory-mapped token files, and training windows are read from them without loading the corpus.

Sources: a local folder of parquet / jsonl shards (one task per parquet row group, one per jsonl file) or a
hub dataset streamed with `datasets` (one task per shard). Each document becomes its tokens + EOS; it goes to
the validation split when a hash of its id falls below `val_fraction` (a fixed, order-free choice of whole
documents), and a validation document whose text equals a training document's is dropped (no leak).
On disk, under `cache_dir/tokens_<key>/` (key: the source, text field, tokenizer, token budget, val fraction):

    train.bin / val.bin   (N,) uint16 when the vocabulary fits (vocab_size <= 65535), else uint32
    train.idx / val.idx   (D + 1,) int64 document boundaries: document d is tokens[idx[d]:idx[d + 1]]
    docs.json, meta.json  document ids per split; dtype, counts, build speed

The folder appears by one rename when complete (atomic: a killed build leaves only a `.partial` folder).
Windows (`MemmapWindows`) lie inside one document each, as data.make_windows cuts them.
Layer: below data (which hands in its tokenizer factory); imports numpy, torch, pyarrow/datasets lazily.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TABLE_SUFFIXES = (".parquet", ".jsonl")
BPE_SAMPLE_CHARS = 20_000_000  # characters of training documents a BPE tokenizer is trained on
FORMAT = 1


# ----------------------------------------------------------------------------- sources and tasks
@dataclass(frozen=True)
class Task:
    """One unit of parallel work: a parquet row group, a jsonl file, or a hub shard."""
    kind: str  # 'parquet' | 'jsonl' | 'hub'
    path: str  # file path, or hub dataset name
    part: int = 0  # parquet row group / hub shard
    first_row: int = 0  # parquet: row number of the group's first row in its file
    n_parts: int = 1  # hub: number of shards
    name: str = ""  # the document id prefix (file path relative to the folder, or the hub name)
    split: str = "train"  # hub split
    data_files: tuple = ()  # hub: a `datasets` builder (e.g. 'parquet') reading these files


def table_files(folder: Path) -> list[Path]:
    """The parquet/jsonl shards under `folder` (sorted, recursive)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TABLE_SUFFIXES)


def local_tasks(folder: Path, text_field: str) -> list[Task]:
    """One task per parquet row group and per jsonl file; refuses a shard without `text_field`."""
    import pyarrow.parquet as pq
    tasks = []
    for path in table_files(folder):
        name = str(path.relative_to(folder))
        if path.suffix == ".parquet":
            meta = pq.ParquetFile(path).metadata
            if text_field not in meta.schema.names:
                raise ValueError(f"{path} has no column {text_field!r}; columns are {meta.schema.names} (set text_field)")
            first = 0
            for group in range(meta.num_row_groups):
                tasks.append(Task("parquet", str(path), group, first, name=name))
                first += meta.row_group(group).num_rows
        else:
            tasks.append(Task("jsonl", str(path), name=name))
    return tasks


def hub_tasks(name: str, split: str, data_files: tuple = ()) -> list[Task]:
    """One task per shard of a streamed hub dataset (or of a `datasets` builder over `data_files`)."""
    stream = _hub_stream(Task("hub", name, split=split, data_files=data_files))
    return [Task("hub", name, part=i, n_parts=stream.n_shards, name=name, split=split, data_files=data_files)
            for i in range(stream.n_shards)]


def _hub_stream(task: Task):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"hub dataset {task.path!r} needs the 'datasets' package: pip install datasets "
                         f"(or give --dataset a local folder of parquet/jsonl files)") from None
    try:
        files = {task.split: list(task.data_files)} if task.data_files else None
        return datasets.load_dataset(task.path, data_files=files, split=task.split, streaming=True)
    except Exception as e:  # network, auth, unknown name: one clear line for the user
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load hub dataset {task.path!r} ({first_line}); it needs internet — "
                         f"offline, use --dataset shakespeare or a local folder") from None


def read_task(task: Task, text_field: str):
    """Yield (doc_id, text) of the task's non-empty documents, in a fixed order."""
    if task.kind == "parquet":
        import pyarrow.parquet as pq
        column = pq.ParquetFile(task.path).read_row_group(task.part, columns=[text_field]).column(0)
        for i, text in enumerate(column.to_pylist()):
            if text:
                yield f"{task.name}:{task.first_row + i}", text
    elif task.kind == "jsonl":
        with open(task.path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{task.path} line {i + 1} is not JSON ({e.msg}); fix or remove that line") from None
                if text_field not in row:
                    raise ValueError(f"{task.path} line {i + 1} has no field {text_field!r}; fields are {sorted(row)} "
                                     f"(set text_field)")
                if row[text_field]:
                    yield f"{task.name}:{i}", row[text_field]
    else:
        stream = _hub_stream(task).shard(num_shards=task.n_parts, index=task.part)
        for i, row in enumerate(stream):
            if text_field not in row:
                raise ValueError(f"hub dataset {task.path!r} has no field {text_field!r}; fields are {sorted(row)} "
                                 f"(set text_field)")
            if row[text_field]:
                yield f"{task.name}:{task.part}:{i}", row[text_field]


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Whole documents are held out by a hash of their id: order-free, the same on every machine."""
    return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "little") / 2**64 < val_fraction


def training_sample(tasks: list[Task], text_field: str, val_fraction: float, chars: int = BPE_SAMPLE_CHARS) -> list[str]:
    """The first `chars` characters' worth of training documents, in task order (what a BPE is trained on)."""
    texts, total = [], 0
    for task in tasks:
        for doc_id, text in read_task(task, text_field):
            if not is_validation(doc_id, val_fraction):
                texts.append(text)
                total += len(text)
                if total >= chars:
                    return texts
    return texts


# ----------------------------------------------------------------------------- parallel tokenisation
_WORKER: dict = {}


def _init_worker(make_tokenizer, spec: dict, text_field: str, val_fraction: float, dtype: str, cap: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER.update(tokenizer=make_tokenizer(spec), text_field=text_field, val_fraction=val_fraction,
                   dtype=np.dtype(dtype), cap=cap)


def _tokenize_task(task: Task) -> dict:
    """The task's documents in order, each followed by EOS, at most `cap` tokens (the whole budget: no task needs
    more) -> {'tokens': (N,), 'lengths': (D,) int64, 'ids': [str], 'hashes': (D,) uint64 of the text,
    'val': (D,) bool}."""
    tokenizer, cap = _WORKER["tokenizer"], _WORKER["cap"]
    eos = tokenizer.eos_id
    out = {"tokens": [], "lengths": [], "ids": [], "hashes": [], "val": []}
    total, batch = 0, []

    def flush():
        nonlocal total
        for (doc_id, text), ids in zip(batch, tokenizer.encode_batch([t for _, t in batch])):
            out["tokens"].append(np.asarray(ids + [eos], dtype=_WORKER["dtype"]))
            out["lengths"].append(len(ids) + 1)
            out["ids"].append(doc_id)
            out["hashes"].append(int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "little"))
            out["val"].append(is_validation(doc_id, _WORKER["val_fraction"]))
            total += len(ids) + 1
        batch.clear()

    for doc in read_task(task, _WORKER["text_field"]):
        batch.append(doc)
        if len(batch) == 256:
            flush()
            if total >= cap:
                break
    flush()
    return {"tokens": np.concatenate(out["tokens"]) if out["tokens"] else np.zeros(0, _WORKER["dtype"]),
            "lengths": np.asarray(out["lengths"], dtype=np.int64), "ids": out["ids"],
            "hashes": np.asarray(out["hashes"], dtype=np.uint64), "val": np.asarray(out["val"], dtype=bool)}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _worker_context():
    """Tokenising workers start from a fork server (a fresh single-threaded process) or by spawn, never as forks of
    this process: a fork copies locks that other threads hold (pyarrow's pool, torch's), and a worker that died of
    that left the Pool waiting forever (a CI run hung in test_a_hub_style_stream_gives_the_same_documents)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def build(folder: Path, tasks: list[Task], make_tokenizer, spec: dict, vocab_size: int, text_field: str,
          val_fraction: float, max_tokens: int, workers: int | None = None, describe: str = "") -> "TokenCorpus":
    """Tokenise `tasks` in `workers` processes (default: the CPU count) into `folder` (atomically), stopping at
    `max_tokens` tokens (whole documents, in task order: the result does not depend on the worker count)."""
    from tqdm.auto import tqdm
    dtype = token_dtype(vocab_size)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    files = {s: open(partial / f"{s}.bin", "wb") for s in ("train", "val")}
    lengths = {s: [] for s in files}
    ids = {s: [] for s in files}
    hashes = {s: [] for s in files}
    total, start = 0, time.perf_counter()
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    context = _worker_context()
    try:
        with context.Pool(workers, _init_worker, (make_tokenizer, spec, text_field, val_fraction, dtype.str,
                                                   max_tokens)) as pool, \
                tqdm(total=len(tasks), desc=f"tokenising {describe}", unit="shard") as bar:
            for result in pool.imap(_tokenize_task, tasks):
                n = _documents_within(result["lengths"], max_tokens - total)  # whole documents, in order
                doc_val = result["val"][:n]
                token_val = np.repeat(doc_val, result["lengths"][:n])  # (tokens of the n documents,) bool
                tokens = result["tokens"][: token_val.size]
                for s, take in (("train", ~doc_val), ("val", doc_val)):
                    files[s].write(tokens[~token_val if s == "train" else token_val].tobytes())
                    lengths[s].append(result["lengths"][:n][take])
                    ids[s] += [d for d, t in zip(result["ids"][:n], take) if t]
                    hashes[s].append(result["hashes"][:n][take])
                total += int(token_val.size)
                bar.update(1)
                bar.set_postfix(tokens=f"{total:,}")
                if total >= max_tokens:
                    pool.terminate()  # the budget is reached: the other shards are not needed
                    break
        for f in files.values():
            f.close()
        seconds = time.perf_counter() - start
        dropped = _drop_leaked_validation(partial, lengths, ids, hashes, dtype)
        for s in files:
            np.save(partial / f"{s}.idx.npy", np.concatenate([[0], np.cumsum(np.concatenate(lengths[s]))]).astype(np.int64))
        (partial / "docs.json").write_text(json.dumps(ids))
        train_tokens, val_tokens = (int(sum(x.sum() for x in lengths[s])) for s in ("train", "val"))
        meta = {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab_size, "tokenised": total,
                "tokens": train_tokens + val_tokens, "train_tokens": train_tokens, "val_tokens": val_tokens,
                "dropped_validation_duplicates": dropped, "workers": workers,
                "build_seconds": seconds, "tokens_per_s": total / seconds if seconds else None}
        (partial / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(partial, folder)  # one rename: the folder exists complete or not at all
        except OSError:  # another process finished the same build first: keep its copy
            shutil.rmtree(partial, ignore_errors=True)
    finally:
        for f in files.values():
            f.close()
        shutil.rmtree(partial, ignore_errors=True)
    return load(folder)


def _documents_within(lengths: np.ndarray, budget: int) -> int:
    """How many leading documents it takes to reach the remaining budget (all of them if they do not)."""
    return min(len(lengths), int(np.searchsorted(np.cumsum(lengths), budget, side="left")) + 1) if budget > 0 else 0


def _drop_leaked_validation(folder: Path, lengths: dict, ids: dict, hashes: dict, dtype: np.dtype) -> int:
    """Validation documents whose text equals a training document's are removed from val.bin (no leak);
    -> how many."""
    val_lengths = np.concatenate(lengths["val"]) if lengths["val"] else np.zeros(0, np.int64)
    train_hashes = set(np.concatenate(hashes["train"]).tolist()) if hashes["train"] else set()
    keep = np.array([h not in train_hashes for h in np.concatenate(hashes["val"]).tolist()] if hashes["val"] else [],
                    dtype=bool)
    if keep.all():
        return 0
    tokens = np.fromfile(folder / "val.bin", dtype=dtype)
    starts = np.concatenate([[0], np.cumsum(val_lengths)[:-1]])
    kept = [tokens[a: a + n] for a, n, k in zip(starts, val_lengths, keep) if k]
    (np.concatenate(kept) if kept else np.zeros(0, dtype)).tofile(folder / "val.bin")
    lengths["val"] = [val_lengths[keep]]
    ids["val"] = [d for d, k in zip(ids["val"], keep) if k]
    print(f"dropped {int((~keep).sum())} validation document(s) identical to training documents", flush=True)
    return int((~keep).sum())


# ----------------------------------------------------------------------------- reading
@dataclass
class TokenFile:
    """One split on disk: tokens (N,) memory-mapped, document boundaries offsets (D + 1,) int64."""
    tokens: np.ndarray  # np.memmap
    offsets: np.ndarray

    def windows(self, seq_len: int) -> "MemmapWindows":
        """Non-overlapping windows of seq_len + 1 tokens, inside one document each (a document's tail shorter
        than a window is dropped): the windows data.make_windows cuts from the same stream."""
        width = seq_len + 1
        starts, ends = self.offsets[:-1], self.offsets[1:]
        counts = (ends - starts) // width
        first = np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)) * width
        return MemmapWindows(self.tokens, first.astype(np.int64), width)


class MemmapWindows:
    """Windows (N, L + 1) read from a memory-mapped token file on demand (the corpus never sits in memory).
    Indexing (a long tensor, an int, a slice, or (rows, columns)) returns an int64 tensor, as a window tensor does."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, width: int):
        self.tokens, self.starts, self.width = tokens, starts, width

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.starts), self.width)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self[key[0]][(slice(None),) + key[1:]]
        if isinstance(key, torch.Tensor):
            key = key.numpy()
        rows = self.starts[key]
        if np.ndim(rows) == 0:
            return torch.from_numpy(self.tokens[int(rows): int(rows) + self.width].astype(np.int64))
        return torch.from_numpy(self.tokens[rows[:, None] + np.arange(self.width)].astype(np.int64))

    def max(self) -> torch.Tensor:
        """The largest token id in any window (read in chunks)."""
        if not len(self):
            return torch.tensor(0)
        return torch.tensor(max(int(self[i: i + 4096].max()) for i in range(0, len(self), 4096)))


@dataclass
class TokenCorpus:
    train: TokenFile
    val: TokenFile
    train_docs: list[str]
    val_docs: list[str]
    meta: dict


def load(folder: Path) -> TokenCorpus:
    """Open a built token-file folder (memory maps; nothing but the ids and boundaries is read)."""
    meta = json.loads((folder / "meta.json").read_text())
    docs = json.loads((folder / "docs.json").read_text())
    split = {}
    for s in ("train", "val"):
        offsets = np.load(folder / f"{s}.idx.npy")
        size = int(offsets[-1])
        tokens = (np.memmap(folder / f"{s}.bin", dtype=meta["dtype"], mode="r", shape=(size,)) if size
                  else np.zeros(0, dtype=meta["dtype"]))
        split[s] = TokenFile(tokens, offsets)
    return TokenCorpus(split["train"], split["val"], docs["train"], docs["val"], meta)


def cache_folder(cache_dir: Path, source: object, tokenizer_spec: dict, text_field: str, max_tokens: int,
                 val_fraction: float) -> Path:
    """tokens_<key>: keyed by the source (files with sizes and mtimes, or a hub name and split), the text
    field, the tokenizer, the token budget and the validation fraction."""
    key = hashlib.sha256(json.dumps([FORMAT, source, tokenizer_spec, text_field, max_tokens, val_fraction],
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir / f"tokens_{key}"
