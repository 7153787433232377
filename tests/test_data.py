"""data.py: documents read as a stream and split by content, tokenised into a token cache that every run shares
and memory-maps, and windows spread over a whole split."""
import gzip
import json

import numpy as np
import pytest

import tiny  # noqa: F401  (puts the project on sys.path)
import data


def split(docs, dev_fraction, test_fraction):
    parts = {"train": [], "dev": [], "test": []}
    for d in docs:
        parts[data.split_of(d, dev_fraction, test_fraction)].append(d.text)
    return parts


def test_split_follows_the_content_not_the_order():
    docs = [data.Doc(f"line {i}", f"document number {i}") for i in range(300)]
    parts = split(docs, 0.1, 0.2)
    # another order (as a reordered .jsonl or text file would give, named by position) changes nothing
    renamed = [data.Doc(f"line {i}", d.text) for i, d in enumerate(reversed(docs))]
    assert {k: set(v) for k, v in split(renamed, 0.1, 0.2).items()} == {k: set(v) for k, v in parts.items()}
    assert sorted(sum(parts.values(), [])) == sorted(d.text for d in docs)
    assert 10 < len(parts["dev"]) < 55 and 30 < len(parts["test"]) < 95
    assert not set(parts["dev"]) & set(parts["test"]) and not set(parts["train"]) & set(parts["test"])
    # 200 copies of one document land on one side; a document stays where it was when others are added
    copies = split(docs + [data.Doc(f"copy {i}", docs[0].text) for i in range(200)], 0.1, 0.2)
    assert sum(docs[0].text in v for v in copies.values()) == 1
    assert set(parts["test"]) <= set(copies["test"])
    # a record's id decides instead of its text: the same id, edited text, same split
    ids = [data.split_of(data.Doc("x", f"version {v}", id="doc-7"), 0.1, 0.2) for v in range(20)]
    assert len(set(ids)) == 1
    assert len({data.split_of(data.Doc("x", f"version {v}"), 0.1, 0.2) for v in range(50)}) == 3


def test_jsonl_split_does_not_depend_on_line_order(tmp_path):
    records = [json.dumps({"text": f"record {i} " * 5}) for i in range(60)]
    (tmp_path / "a.jsonl").write_text("\n".join(records))
    (tmp_path / "b.jsonl").write_text("\n".join(reversed(records)))
    a, b = (split(data.read_documents(tmp_path / f), 0.2, 0.2) for f in ("a.jsonl", "b.jsonl"))
    assert {k: set(v) for k, v in a.items()} == {k: set(v) for k, v in b.items()}


def test_gzip_data_reads_like_the_plain_file(tmp_path):
    text = "first document\n\nsecond one\n\nthird"
    (tmp_path / "d.txt").write_text(text)
    with gzip.open(tmp_path / "d.txt.gz", "wt") as f:
        f.write(text)
    plain, packed = data.read_documents(tmp_path / "d.txt"), data.read_documents(tmp_path / "d.txt.gz")
    assert [d.text for d in plain] == [d.text for d in packed] == ["first document", "second one", "third"]


def test_spread_covers_the_whole_split():
    w = data.Windows(np.arange(1001, dtype=np.uint32), 10, 0)
    assert w.n == 100
    assert w.spread(0) == list(range(100)) == w.spread(500)
    five = w.spread(5)
    assert five[0] == 0 and five[-1] == 99 and len(five) == 5  # first and last window, evenly between
    assert all(20 <= b - a <= 30 for a, b in zip(five, five[1:]))
    # documents scored: end-of-text (3) closes documents 0 (tokens 0-2) and 1 (tokens 3-11); document 2 is token 12
    tokens = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4], dtype=np.uint32)
    w = data.Windows(tokens, 4, 0, eos_id=3)
    assert w.n == 3  # the targets of window j are tokens 4j + 1 .. 4j + 4
    assert [w.documents_in([j]) for j in range(3)] == [2, 1, 2] and w.documents_in([0, 1, 2]) == 3




# ----------------------------------------------------------------------------------------------------------
# The token cache.

@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([f"document {i} with some words" for i in range(50)],
                          trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>"], show_progress=False))
    return t


def corpus(path, n=60):
    path.mkdir()
    for i in range(n):
        (path / f"d{i:03d}.txt").write_text(f"document {i} " + "with some words " * (i % 7 + 1))
    return path


def test_streams_are_each_document_then_end_of_text(tmp_path, tok):
    src = corpus(tmp_path / "c")
    streams = data.token_streams(src, tok, 0.2, 0.2, tmp_path / "cache")
    eos = tok.token_to_id("<|endoftext|>")
    parts = split(data.read_documents(src), 0.2, 0.2)
    for s in data.SPLITS:
        assert isinstance(streams[s], np.memmap) and streams[s].dtype == np.uint32
        assert streams[s].tolist() == [i for t in parts[s] for i in tok.encode(t).ids + [eos]]


def test_a_documents_own_end_of_text_string_stays_text(tmp_path, tok):
    src = tmp_path / "c"
    src.mkdir()
    for i in range(40):
        (src / f"d{i}.txt").write_text(f"document {i} <|endoftext|> and more words")
    streams = data.token_streams(src, tok, 0.2, 0.2, tmp_path / "cache")
    eos = tok.token_to_id("<|endoftext|>")
    parts = split(data.read_documents(src), 0.2, 0.2)
    for s in data.SPLITS:  # one end-of-text per document: the appended one
        assert int((streams[s] == eos).sum()) == len(parts[s])
    assert tok.encode_special_tokens is False  # the caller's tokenizer is left as it was


def test_a_second_call_reads_the_cache_and_a_change_tokenises_again(tmp_path, tok, monkeypatch):
    src, cache = corpus(tmp_path / "c"), tmp_path / "cache"
    first = data.token_streams(src, tok, 0.2, 0.2, cache)
    calls = []
    tokenize = data.tokenize
    monkeypatch.setattr(data, "tokenize", lambda *a: calls.append(1) or tokenize(*a))
    again = data.token_streams(src, tok, 0.2, 0.2, cache)
    assert calls == [] and all(np.array_equal(first[s], again[s]) for s in data.SPLITS)
    data.token_streams(src, tok, 0.1, 0.2, cache)  # another split
    (src / "d000.txt").write_text("an edited document")  # other content
    data.token_streams(src, tok, 0.2, 0.2, cache)
    assert calls == [1, 1]
    assert not list(cache.glob("*.tmp"))


def test_refused_streams_leave_no_file(tmp_path, tok):
    src, cache = corpus(tmp_path / "c"), tmp_path / "cache"

    def refuse(streams):
        raise data.DataError("no")
    with pytest.raises(data.DataError):
        data.token_streams(src, tok, 0.2, 0.2, cache, check=refuse)
    assert not list(cache.glob("*.u32")) and not list(cache.glob("*.tmp"))


def test_concurrent_processes_tokenise_once(tmp_path, tok):
    """Processes started together (as torchrun starts them) wait for one another on a file lock, outside any
    collective; one tokenises, the others read its cache. The processes are released at the same moment."""
    import subprocess
    import sys
    import time
    src, cache, go = corpus(tmp_path / "c", n=3000), tmp_path / "cache", tmp_path / "go"
    tok.save(str(tmp_path / "tok.json"))
    script = (f"import os, sys, time; sys.path.insert(0, {str(tiny.ROOT)!r}); import data; "
              f"from tokenizers import Tokenizer; t = Tokenizer.from_file({str(tmp_path / 'tok.json')!r}); "
              f"open(sys.argv[1], 'w').close()\nwhile not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
              f"s = data.token_streams({str(src)!r}, t, 0.2, 0.2, data.Path({str(cache)!r})); "
              f"print(sum(len(v) for v in s.values()))")
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in ready]
    while not all(r.exists() for r in ready) and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=1200) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({o for o, _ in outs}) == 1
    assert sum(e.count("tokenising") > 0 for _, e in outs) == 1
