"""Hub-scale token files on a generated parquet/jsonl folder: the memory-mapped tokens equal the in-memory
tokenisation document by document, windows equal data.make_windows' and never cross a document end, identical
documents never straddle the split, the budget cuts whole documents, and the second call is a cache hit."""
import json
import random

import numpy as np
import pytest
import torch

from dsa_lab.training import data
from dsa_lab.training import token_files
from config import DataConfig
from dsa_lab.training.data import BatchStream, build_windows, eval_subset, load_corpus, make_windows

WORDS = "the a of to and king queen sword crown night storm ship sea lord lady death love war".split()
DUPLICATE = "this very same text appears in many documents " * 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 parquet files (2 row groups each, one empty text, many copies of one text) and a jsonl file below."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("shards")
    rng = random.Random(0)
    texts = {}
    for f in range(3):
        rows = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) for _ in range(30)]
        rows[3], rows[7], rows[11] = "", DUPLICATE, DUPLICATE
        pq.write_table(pa.table({"text": rows, "n": list(range(30))}), root / f"part{f}.parquet", row_group_size=16)
        texts.update({f"part{f}.parquet:{i}": t for i, t in enumerate(rows) if t})
    (root / "more").mkdir()
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) for _ in range(12)] + [DUPLICATE] * 4
    (root / "more" / "extra.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    texts.update({f"more/extra.jsonl:{i}": t for i, t in enumerate(lines)})
    return root, texts


def _cfg(root, tmp_path, **kw):
    return DataConfig(dataset=str(root), cache_dir=str(tmp_path / "cache"), bpe_vocab_size=300, **kw)


def test_token_files_equal_the_in_memory_tokenisation_and_windows_stay_inside_documents(shards, tmp_path):
    root, texts = shards
    corpus = load_corpus(_cfg(root, tmp_path))
    assert isinstance(corpus.train_tokens, np.memmap) and corpus.train_tokens.dtype == np.uint16
    tok, eos = corpus.tokenizer, corpus.tokenizer.eos_id
    # sorted files, then rows: the order tasks are written in, whatever the worker count
    order = sorted(texts, key=lambda d: (d.split(":")[0], int(d.split(":")[1])))
    assert corpus.train_docs + corpus.val_docs and not set(corpus.train_docs) & set(corpus.val_docs)
    assert corpus.train_docs == [d for d in order if not token_files.is_validation(d, 0.1)]
    for split, docs in (("train", corpus.train_docs), ("val", corpus.val_docs)):
        file = getattr(corpus.files, split)
        assert len(file.offsets) == len(docs) + 1
        for d, doc in enumerate(docs):
            assert file.tokens[file.offsets[d]: file.offsets[d + 1]].tolist() == tok.encode(texts[doc]) + [eos], doc
    train_texts = {texts[d] for d in corpus.train_docs}
    assert DUPLICATE in train_texts and not {texts[d] for d in corpus.val_docs} & train_texts  # no leak
    windows = build_windows(corpus, 16)
    reference = make_windows(np.asarray(corpus.train_tokens).astype(np.int32), 16, eos)
    assert len(windows.train) == len(reference) > 50
    assert torch.equal(windows.train[torch.arange(len(reference))], reference)  # the in-memory cut, row for row
    assert not (windows.train[torch.arange(len(reference))][:, :-1] == eos).any()  # no window runs past a doc end
    assert windows.train[3].tolist() == reference[3].tolist() and torch.equal(windows.train[2:5, :-1], reference[2:5, :-1])
    val = eval_subset(windows.val, 10_000)
    assert isinstance(val, torch.Tensor) and val.shape[1] == 17
    inputs, targets = BatchStream(windows.train, 4, 0).next()
    assert inputs.shape == (4, 16) and torch.equal(inputs[:, 1:], targets[:, :-1])
    assert int(windows.train.max()) == int(corpus.train_tokens.max())


def test_the_second_call_is_a_cache_hit_and_the_budget_cuts_whole_documents(shards, tmp_path, monkeypatch):
    root, texts = shards
    full = load_corpus(_cfg(root, tmp_path))
    monkeypatch.setattr(token_files, "build", lambda *a, **k: pytest.fail("rebuilt instead of read from the cache"))
    monkeypatch.setattr(data, "train_bpe", lambda *a, **k: pytest.fail("tokenizer retrained"))
    again = load_corpus(_cfg(root, tmp_path))
    assert again.train_docs == full.train_docs and np.array_equal(again.train_tokens, full.train_tokens)
    monkeypatch.undo()
    small = load_corpus(_cfg(root, tmp_path, max_tokens=6000))
    total = small.files.meta["tokenised"]  # (before validation copies of training documents are dropped)
    assert small.files.meta["tokens"] == small.train_tokens.size + small.val_tokens.size
    assert 6000 <= total < 6000 + max(len(small.tokenizer.encode(t)) + 1 for t in texts.values())
    assert small.train_docs == full.train_docs[: len(small.train_docs)]  # a prefix, in the same order
    assert len(list((tmp_path / "cache").glob("tokens_*"))) == 2 and not list((tmp_path / "cache").glob("*partial*"))


def test_a_hub_style_stream_gives_the_same_documents(shards, tmp_path):
    """The hub path (one task per shard of a streamed `datasets` dataset), fed local parquet through the generic
    'parquet' builder: the same texts tokenise to the same ids."""
    root, texts = shards
    corpus = load_corpus(_cfg(root, tmp_path))
    files = tuple(str(p) for p in sorted(root.glob("*.parquet")))
    tasks = token_files.hub_tasks("parquet", "train", data_files=files)
    assert len(tasks) == 3
    built = token_files.build(tmp_path / "hub", tasks, data.Tokenizer.from_spec, corpus.tokenizer.spec(),
                              corpus.tokenizer.vocab_size, "text", 0.1, 10**9, workers=2)
    by_id = {f"parquet:{f}:{i}": texts[f"part{f}.parquet:{i}"] for f in range(3) for i in range(30)
             if f"part{f}.parquet:{i}" in texts}  # shard f = file f, rows in order
    docs = built.train_docs + built.val_docs
    assert len(docs) + built.meta["dropped_validation_duplicates"] == len(by_id) and set(docs) <= set(by_id)
    for split, names in (("train", built.train_docs), ("val", built.val_docs)):
        file = getattr(built, split)
        for d, doc in enumerate(names):
            ids = file.tokens[file.offsets[d]: file.offsets[d + 1]].tolist()
            assert ids == corpus.tokenizer.encode(by_id[doc]) + [corpus.tokenizer.eos_id]


def test_token_dtype_and_errors(tmp_path):
    assert token_files.token_dtype(65535) == np.uint16 and token_files.token_dtype(65536) == np.uint32
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "mixed" / "b.txt").write_text("y")
    with pytest.raises(ValueError, match="holds both text files and parquet/jsonl tables"):
        load_corpus(DataConfig(dataset=str(tmp_path / "mixed"), cache_dir=str(tmp_path / "c")))
    (tmp_path / "mixed" / "b.txt").unlink()
    (tmp_path / "mixed" / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="has no field 'text'"):
        load_corpus(DataConfig(dataset=str(tmp_path / "mixed"), cache_dir=str(tmp_path / "c")))


def test_token_file_windows_of_a_document_are_disjoint_and_start_L_plus_1_apart():
    """The token-file cutter on its own: each document's windows start at its first token, then every L+1 tokens
    (no token shared by neighbouring windows), as many as fit, and read back the tokens at those positions."""
    seq_len, width, eos = 4, 5, 0
    lengths = [11, 5, 3, 10, 16]  # with EOS: 2, 1, 0, 2, 3 windows (3 is shorter than a window)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(1, offsets[-1] + 1, dtype=np.uint16)  # token at position i is i + 1
    tokens[offsets[1:] - 1] = eos
    windows = token_files.TokenFile(tokens, offsets).windows(seq_len)
    expected = [int(a) + j * width for a, b in zip(offsets[:-1], offsets[1:]) for j in range((b - a) // width)]
    starts = windows.starts.tolist()
    assert starts == expected, f"every L+1 = {width} tokens per document, got {starts}"
    assert windows.shape == (len(expected), width)
    rows = windows[torch.arange(len(windows))]
    for w, s in zip(rows, starts):
        assert w.tolist() == tokens[s: s + width].tolist()
    doc_of = np.searchsorted(offsets, starts, side="right") - 1
    for i in range(len(starts) - 1):
        if doc_of[i] == doc_of[i + 1]:  # neighbours in one document: disjoint, L+1 apart
            assert starts[i + 1] - starts[i] == width and not set(rows[i].tolist()) & set(rows[i + 1].tolist())


def test_workers_never_start_as_forks_of_the_caller():
    """Tokenising workers start from a fork server or by spawn: a fork of a process with torch's and pyarrow's
    threads can copy a held lock, and a worker that died of it left the Pool hanging (seen once in CI)."""
    assert token_files._worker_context().get_start_method() in ("forkserver", "spawn")
