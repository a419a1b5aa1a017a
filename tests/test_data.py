"""Data: embedded corpus, held-out documents, non-overlapping windows, tokenizer, local files, errors."""
import json

import numpy as np
import pytest
import torch

from dsa_lab.training import data
from config import DataConfig
from dsa_lab.training.data import (BatchStream, Corpus, build_windows, check_no_overlap, clean_markdown, load_corpus,
                  load_documents, make_windows, split_documents)


def test_shakespeare_is_38_plays_read_as_files_and_cleaned():
    docs = load_documents(DataConfig())
    assert len(docs) == 38 and len({d for d, _ in docs}) == 38
    hamlet = dict(docs)["tragedies/hamlet"]
    assert "To be, or not to be" in hamlet and "**" not in hamlet and "\n#" not in hamlet
    assert clean_markdown("## ACT I\n**HAMLET**  \n_Exit_") == "ACT I\nHAMLET\nExit"


def test_split_holds_out_whole_documents_deterministically():
    docs = [(f"d{i}", f"text {i}") for i in range(20)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == 2 and not {d for d, _ in train} & {d for d, _ in val}
    assert split_documents(docs, 0.1) == (train, val)
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(docs[:1], 0.1)


def test_corpus_windows_never_overlap_and_validation_is_held_out(corpus):
    assert not set(corpus.train_docs) & set(corpus.val_docs)
    assert len(corpus.val_docs) == 4 and corpus.tokenizer.vocab_size == 4096
    w = build_windows(corpus, 64)
    eos = corpus.tokenizer.eos_id
    assert not (w.train[:, :-1] == eos).any() and not (w.val[:, :-1] == eos).any()  # no window crosses a play's end
    assert torch.equal(w.val[0], torch.from_numpy(corpus.val_tokens[:65].astype(np.int64)))
    assert len(w.train) > 0.95 * len(corpus.train_tokens) / 65  # only the plays' tails are dropped


def test_overlap_check_catches_a_validation_document_that_duplicates_training():
    tokens = np.arange(40, dtype=np.int32)
    fake = Corpus(tokens, tokens[:20].copy(), ["a"], ["b"], tokenizer=None)
    with pytest.raises(ValueError, match="identical to training windows"):
        check_no_overlap(fake, make_windows(fake.train_tokens, 9), make_windows(fake.val_tokens, 9))
    shared = Corpus(tokens, tokens + 100, ["a", "b"], ["b"], tokenizer=None)
    with pytest.raises(ValueError, match="in both train and validation"):
        check_no_overlap(shared, make_windows(shared.train_tokens, 9), make_windows(shared.val_tokens, 9))


def test_bpe_is_trained_on_training_documents_only(tmp_path, monkeypatch):
    seen = []
    real = data.train_bpe
    monkeypatch.setattr(data, "train_bpe", lambda texts, v: (seen.extend(texts), real(texts, v))[1])
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(10):
        (folder / f"doc{i}.txt").write_text(f"document number {i} " * 50 + f"UNIQUE{i}")
    c = load_corpus(DataConfig(dataset=str(folder), bpe_vocab_size=300, val_fraction=0.2,
                               cache_dir=str(tmp_path / "cache")))
    val_markers = {f"UNIQUE{d.removeprefix('doc').removesuffix('.txt')}" for d in c.val_docs}
    assert seen and not any(m in t for t in seen for m in val_markers)
    again = load_corpus(DataConfig(dataset=str(folder), bpe_vocab_size=300, val_fraction=0.2,
                                   cache_dir=str(tmp_path / "cache")))  # from the cache
    assert np.array_equal(again.train_tokens, c.train_tokens) and len(seen) == 8


def test_tokenizer_spec_round_trip(corpus):
    tok = data.Tokenizer.from_spec(corpus.tokenizer.spec())
    text = "Now is the winter of our discontent"
    assert tok.encode(text) == corpus.tokenizer.encode(text) and tok.decode(tok.encode(text)) == text


def test_local_jsonl_parquet_and_text_files(tmp_path):
    rows = [{"text": f"row {i} " * 30} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert len(load_documents(DataConfig(dataset=str(tmp_path / "d.jsonl")))) == 5
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": [r["text"] for r in rows]}), tmp_path / "d.parquet")
    assert len(load_documents(DataConfig(dataset=str(tmp_path / "d.parquet"), text_field="body"))) == 5
    with pytest.raises(ValueError, match="no column 'text'"):
        load_documents(DataConfig(dataset=str(tmp_path / "d.parquet")))
    (tmp_path / "big.txt").write_text("\n\n".join("para " * 2000 for _ in range(10)))
    assert len(load_documents(DataConfig(dataset=str(tmp_path / "big.txt")))) >= 5


def test_missing_path_and_unreachable_hub_name_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        load_documents(DataConfig(dataset="./no/such/file.txt"))
    import datasets
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what a machine without internet sees, at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="needs internet"):
        load_documents(DataConfig(dataset="someone/not-a-real-dataset-xyz"))


def test_too_long_seq_len_for_the_data_is_a_clear_error():
    from types import SimpleNamespace
    fake = Corpus(np.arange(30, dtype=np.int32), np.arange(100, 110, dtype=np.int32), ["a"], ["b"],
                  SimpleNamespace(eos_id=-1))
    with pytest.raises(ValueError, match="leaves no validation window"):
        build_windows(fake, 16)


def test_batch_stream_is_seeded():
    windows = torch.arange(100).view(20, 5)
    a, b = BatchStream(windows, 4, 7), BatchStream(windows, 4, 7)
    for _ in range(8):  # across an epoch boundary
        xa, ya = a.next()
        xb, _ = b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, xa + 1)
    assert not torch.equal(BatchStream(windows, 4, 8).next()[0], BatchStream(windows, 4, 7).next()[0])


def test_windows_never_cross_a_document_boundary():
    import numpy as np
    from dsa_lab.training.data import make_windows
    eos = 0
    docs = [np.arange(1, 12), np.arange(20, 25), np.arange(30, 40)]  # lengths 11, 5, 10 (+ EOS each)
    tokens = np.concatenate([np.append(d, eos) for d in docs]).astype(np.int32)
    windows = make_windows(tokens, 4, eos)  # width 5: doc 1 gives 2, doc 2 gives 1, doc 3 gives 2
    assert windows.shape == (5, 5)
    for w in windows:
        inner = w[:-1]
        assert not (inner == eos).any(), f"window {w.tolist()} runs past a document end"
    assert windows[0].tolist() == [1, 2, 3, 4, 5] and windows[2].tolist() == [20, 21, 22, 23, 24]
    assert windows[3].tolist() == [30, 31, 32, 33, 34]
    packed = make_windows(tokens, 4)  # no eos_id: packed windows run across document ends
    assert (packed[:, :-1] == eos).any()


def test_consecutive_windows_of_a_document_are_disjoint_and_start_L_plus_1_apart():
    """Each document's windows start at its first token, then every L+1 tokens (inputs and shifted targets of
    neighbouring windows share no token), as many as fit; the packed cut (no EOS) follows the same rule."""
    seq_len, width, eos = 4, 5, 0
    lengths = [11, 5, 3, 10, 16]  # with EOS: 2, 1, 0, 2, 3 windows (3 is shorter than a window)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.arange(1, offsets[-1] + 1, dtype=np.int32)  # token at position i is i + 1: a window names its start
    tokens[offsets[1:] - 1] = eos  # each document ends with its EOS
    windows = make_windows(tokens, seq_len, eos)
    starts = (windows[:, 0] - 1).tolist()
    expected = [int(a) + j * width for a, b in zip(offsets[:-1], offsets[1:]) for j in range((b - a) // width)]
    assert starts == expected, f"window starts {starts}, expected {expected} (every L+1 = {width} tokens per document)"
    for w, s in zip(windows, starts):
        assert w.tolist() == tokens[s: s + width].tolist()
    doc_of = np.searchsorted(offsets, starts, side="right") - 1
    for i in range(len(starts) - 1):
        if doc_of[i] == doc_of[i + 1]:  # neighbours in one document: disjoint, L+1 apart
            assert starts[i + 1] - starts[i] == width
            assert not set(windows[i].tolist()) & set(windows[i + 1].tolist())
    packed = make_windows(tokens, seq_len)  # no EOS: windows at 0, L+1, 2(L+1), ... of the whole stream
    assert len(packed) == tokens.size // width
    assert torch.equal(packed, torch.from_numpy(tokens[: len(packed) * width].astype(np.int64)).view(-1, width))
