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


def test_a_cap_per_document_keeps_at_most_that_many_windows_of_each_spread_over_it():
    # documents of 50, 5 and 200 windows of 4 tokens (each document ends with end-of-text, id 3)
    lengths = (200, 20, 800)
    tokens = np.concatenate([np.r_[np.full(n - 1, 7), 3] for n in lengths]).astype(np.uint32)
    w = data.Windows(np.r_[tokens, 7].astype(np.uint32), 4, 0, eos_id=3)
    middle_doc = lambda j: int(np.searchsorted(np.cumsum(lengths), 4 * j + 3, side="right"))  # noqa: E731
    for cap in (1, 3, 10):
        picked = w.spread(0, cap)
        per_doc = {d: [j for j in picked if middle_doc(j) == d] for d in range(3)}
        assert [len(v) for v in per_doc.values()] == [cap, min(cap, 5), cap]
        if cap > 1:  # spread from the document's first window to its last
            assert per_doc[2][0] == 55 and per_doc[2][-1] == 254
    assert w.spread(0, 0) == list(range(w.n))
    assert len(w.spread(2, 3)) == 2  # then k of those, spread evenly




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


# ----------------------------------------------------------------------------------------------------------
# Parquet: the same documents as a .jsonl, read one record batch at a time.

def parquet_and_jsonl(path, records, **write):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.mkdir()
    pq.write_table(pa.Table.from_pylist(records), path / "docs.parquet", **write)
    (path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path / "docs.parquet", path / "docs.jsonl"


@pytest.mark.parametrize("with_id", [False, True], ids=["text", "text-and-id"])
def test_parquet_gives_the_token_streams_of_the_same_jsonl(tmp_path, tok, with_id):
    # 2,500 rows in row groups of 300: several record batches, and a batch boundary inside a row group
    records = [{"text": f"document {i} " + "with some words " * (i % 7 + 1) + "\u00e9\u4e2d\n\nend"} for i in range(2500)]
    if with_id:
        for i, r in enumerate(records):
            r["id"] = i % 1700  # ints, as FineWeb-Edu's; repeated ids go to one split
    pq_file, jsonl = parquet_and_jsonl(tmp_path / "d", records, row_group_size=300)
    docs = list(data.read_documents(pq_file))
    assert [(d.text, d.id) for d in docs] == [(d.text, d.id) for d in data.read_documents(jsonl)]
    assert (docs[1800].id == "100") if with_id else docs[0].id is None
    a = data.token_streams(pq_file, tok, 0.2, 0.2, tmp_path / "cache")
    b = data.token_streams(jsonl, tok, 0.2, 0.2, tmp_path / "cache")
    for s in data.SPLITS:
        assert len(a[s]) > 1000 and a[s].tobytes() == b[s].tobytes(), s
    # a directory of *.parquet reads each file in name order, like a directory of .jsonl
    (tmp_path / "d" / "docs.jsonl").unlink()
    assert [d.text for d in data.read_documents(tmp_path / "d")] == [r["text"] for r in records]


def test_parquet_is_streamed_in_record_batches(tmp_path):
    # 24 MB of text in row groups of about 1 MB: reading it must never hold more than a few batches in Arrow's memory
    import pyarrow as pa
    records = [{"text": f"{i} " + "x" * 1200} for i in range(20_000)]
    file, _ = parquet_and_jsonl(tmp_path / "d", records, row_group_size=800)
    peak = n = 0
    for doc in data.read_documents(file):
        n += 1
        if n % 97 == 0:
            peak = max(peak, pa.total_allocated_bytes())
    assert n == 20_000 and doc.text == records[-1]["text"]
    assert peak < 6e6, peak  # the whole file would be 24e6


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    file, _ = parquet_and_jsonl(tmp_path / "d", [{"text": "a document"}])
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(data.DataError, match="pip install pyarrow"):
        list(data.read_documents(file))


@pytest.mark.parametrize("what", ["no text column", "text not a string", "not parquet"])
def test_unusable_parquet_is_one_line(tmp_path, what):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "d").mkdir()
    file = tmp_path / "d" / "x.parquet"
    if what == "no text column":
        pq.write_table(pa.table({"content": ["a", "b"]}), file)
    elif what == "text not a string":
        pq.write_table(pa.table({"text": ["a", None]}), file)
    else:
        file.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(data.DataError) as e:
        list(data.read_documents(file))
    assert str(e.value).startswith(str(file)) and "\n" not in str(e.value)
    assert {"no text column": "no 'text' column", "text not a string": "row 2", "not parquet": "not a readable"}[what] in str(e.value)


def test_data_stdlib_names_the_demo_corpus_unless_such_a_file_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, files = data.data_files("stdlib")
    assert (root, files) == data.stdlib_files() and len(files) > 100
    assert all("test" not in f.relative_to(root).parts for f in files)
    (tmp_path / "stdlib").mkdir()
    (tmp_path / "stdlib" / "mine.txt").write_text("my own corpus")
    assert [d.text for d in data.read_documents("stdlib")] == ["my own corpus"]
