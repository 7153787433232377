"""Data: documents -> token streams (train, dev, test) -> windows of seq_len + 1 tokens.

Documents are read as a stream (a .jsonl line by line, .gz through gzip, a .parquet one record batch at a
time), given a split by a hash of their content, tokenised in chunks straight into uint32 files, and written
once to a token cache that every run and every process memory-maps. Also the demo's corpus (the standard library's source) and its BPE.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import sys
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from load_qwen import atomic_write, publish

SPLITS = ("train", "dev", "test")
# Bumped whenever documents are read, split or tokenised differently, so that old caches are not reused.
FORMAT = "ouroboros-tokens-2"


class DataError(Exception):
    """Data that no run can use; the message says which file and what to do."""


class Doc(NamedTuple):
    name: str  # a label: its file, and the line or paragraph it starts at
    text: str
    id: str | None = None  # a .jsonl record's "id": the split follows it instead of the text


# ----------------------------------------------------------------------------------------------------------
# Reading documents, one at a time.

def stdlib_files() -> tuple[Path, list[Path]]:
    """The demo corpus: the running interpreter's standard library source, present on every machine.
    Its test suites are left out (they are mostly generated data and would dominate)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
    # Sorted: rglob's order is the file system's, and a fixed order gives the same streams and cache key everywhere.
    return root, sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))


def is_stdlib(path) -> bool:
    """--data stdlib (or no --data, in the demo) names the demo's corpus, unless a file of that name exists."""
    return path is None or (str(path) == "stdlib" and not Path("stdlib").exists())


def check_data_path(path) -> None:
    if path is not None and not str(path).strip():
        raise DataError("--data is empty (an unset shell variable?); pass a text file, a directory, a .jsonl or a .parquet")


def data_files(path) -> tuple[Path, list[Path]]:
    """The files --data names (None or "stdlib": the demo corpus), checked before anything is read."""
    if is_stdlib(path):
        return stdlib_files()
    check_data_path(path)
    path = Path(path)
    if path.is_dir():  # hidden files and folders (.git, .DS_Store) are not documents
        return path, sorted(f for f in path.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(path).parts))
    if path.is_file():
        return path.parent, [path]
    raise DataError(f"{path}: no such file or directory; pass --data a text file, a directory, a .jsonl or a .parquet")


def text_lines(file: Path) -> Iterator[str]:
    """A file's lines, through gzip for .gz; anything that is not UTF-8 text (a binary file) is refused."""
    try:
        with (gzip.open(file, "rt", encoding="utf-8") if file.suffix == ".gz" else open(file, encoding="utf-8")) as f:
            for line in f:
                if "\0" in line:  # NUL never occurs in text, but a binary file can still decode as UTF-8
                    raise UnicodeError  # reported below, like a decoding error
                yield line
    except (UnicodeError, gzip.BadGzipFile, EOFError, zlib.error):  # bad UTF-8; not gzip, cut short, corrupt
        raise DataError(f"{file}: not a UTF-8 text file (binary data?); pass text, a .jsonl, or a .gz of either") from None


def jsonl_documents(file: Path) -> Iterator[Doc]:
    for n, line in enumerate(text_lines(file), 1):  # n: the line number, counted from 1 as editors do
        if not line.strip():  # blank lines (a trailing one, say) hold no record
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None  # refused just below, with the line number
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            what = "not a JSON object" if not isinstance(record, dict) else \
                "no 'text' field" if "text" not in record else f"'text' is {json.dumps(record['text'])}, not a string"
            raise DataError(f"{file}:{n}: {what}; each line must be a JSON object with a string 'text' field")
        # The id is kept as a string: split_of hashes it as text, whether the JSON held a number or a string.
        yield Doc(f"{file.name}:{n}", record["text"], None if record.get("id") is None else str(record["id"]))


def paragraphs(file: Path) -> Iterator[Doc]:
    """A text file's documents: the paragraphs between blank lines."""
    lines, n = [], 0  # the current paragraph's lines, and its number
    for line in text_lines(file):
        if line.strip():
            lines.append(line)
        elif lines:
            yield Doc(f"{file.name}, paragraph {n}", "".join(lines).rstrip("\n"))
            lines, n = [], n + 1
    if lines:  # the last paragraph, when no blank line follows it
        yield Doc(f"{file.name}, paragraph {n}", "".join(lines).rstrip("\n"))


def parquet_documents(file: Path) -> Iterator[Doc]:
    """A parquet file's rows: its 'text' column and optional 'id' (FineWeb-Edu's layout), read one record batch
    at a time so memory stays flat whatever the file's size. pyarrow is needed only here."""
    try:
        import pyarrow.parquet as pq  # optional: only a parquet --data needs it
    except ImportError:
        raise DataError(f"{file}: reading parquet needs pyarrow; pip install pyarrow") from None
    try:
        reader = pq.ParquetFile(file)
        columns = reader.schema_arrow.names  # from the file's footer: no row is read yet
        if "text" not in columns:
            raise DataError(f"{file}: no 'text' column (it has {', '.join(columns[:8])}); pass a parquet file with "
                            "the documents in a string column named 'text'")
        n = 0  # rows so far, over all batches, for messages
        # Only 'text' and 'id' are read: FineWeb-Edu's other columns (url, score, ...) are never loaded.
        for batch in reader.iter_batches(batch_size=1024, columns=["text"] + (["id"] if "id" in columns else [])):
            ids = batch.column("id").to_pylist() if "id" in columns else [None] * batch.num_rows  # None: by text
            for text, doc_id in zip(batch.column("text").to_pylist(), ids):
                n += 1
                if not isinstance(text, str):  # a null cell reads as None
                    raise DataError(f"{file}: row {n}: 'text' is {text!r}, not a string; every row needs its text")
                yield Doc(f"{file.name}:{n}", text, None if doc_id is None else str(doc_id))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise DataError(f"{file}: not a readable parquet file ({e}); pass a parquet file with a 'text' column") from None


def read_documents(path) -> Iterator[Doc]:
    """Documents, one at a time, from a text file (split at blank lines), a directory (one file each, or the
    records of its .jsonl and .parquet files), a .jsonl or a .parquet. None or "stdlib" means the demo corpus."""
    root, files = data_files(path)
    for f in files:
        if is_stdlib(path):  # the standard library holds a few files that are not UTF-8; read them as best we can
            yield Doc(str(f.relative_to(root)), f.read_text(errors="replace"))
        elif f.name.endswith((".jsonl", ".jsonl.gz")):  # one document per line, in a directory too
            yield from jsonl_documents(f)
        elif f.suffix == ".parquet":  # one document per row
            yield from parquet_documents(f)
        elif Path(path).is_dir():  # any other file in a directory is one document
            yield Doc(str(f.relative_to(root)), "".join(text_lines(f)))
        else:  # --data is one text file: one document per paragraph
            yield from paragraphs(f)


def split_of(doc: Doc, dev_fraction: float, test_fraction: float) -> str:
    """A document's split, from a hash of its content (or its id): the same wherever the document sits in the
    corpus, and copies of one document always land together."""
    key = doc.text if doc.id is None else f"id:{doc.id}"  # with an id, an edited text keeps its split
    # sha256, not hash(): Python salts str hashes per process, and the split must be the same in every run.
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8  # the first 32 bits, as a number in [0, 1)
    # u is uniform: about test_fraction of the documents (not of the tokens) go to test, dev_fraction to dev.
    return "test" if u < test_fraction else "dev" if u < test_fraction + dev_fraction else "train"


def source_digest(path) -> str:
    """A hash of every byte --data reads (and of the file names): the token cache's key."""
    root, files = data_files(path)
    h = hashlib.sha256(FORMAT.encode())  # a new FORMAT changes every key
    for f in files:
        # Names relative to the root, so a moved corpus keeps its cache; the \0s keep fields from running together.
        h.update(f"\0{f.relative_to(root)}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:  # the content, not the mtime: a touched file keeps its cache
            digest = hashlib.sha256()  # (hashlib.file_digest would do this, from Python 3.11 on)
            while block := fh.read(1 << 20):  # 1 MiB at a time: memory stays flat
                digest.update(block)
            h.update(digest.digest())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Tokenising into the cache.

def eos_token_id(tokenizer) -> int:
    for tok in ("<|endoftext|>", "</s>", "<eos>"):  # Qwen and GPT-2; Llama 2 and Mistral; Gemma
        if (i := tokenizer.token_to_id(tok)) is not None:
            return i
    raise DataError("the tokenizer has no end-of-text token (<|endoftext|>); use the checkpoint's own tokenizer.json")


def token_cache(root: Path | None) -> Path:
    """--token-cache, by default the per-user cache directory ($XDG_CACHE_HOME/ouroboros/tokens)."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ouroboros" / "tokens"


def load_stream(file: Path) -> np.ndarray:
    # memory-mapped, so every run and every process shares the page cache instead of holding a copy;
    # np.memmap refuses an empty file, hence the zeros
    return np.memmap(file, dtype=np.uint32, mode="r") if file.stat().st_size else np.zeros(0, np.uint32)


@contextlib.contextmanager
def locked(file: Path):
    """One process at a time: the others wait here (outside any collective, so no watchdog fires) and then
    find the cache written."""
    with open(file, "a") as f:  # "a": created if absent, never truncated
        fcntl.flock(f, fcntl.LOCK_EX)  # waits for the holder; the OS releases the lock if that process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def token_streams(path, tokenizer, dev_fraction: float, test_fraction: float, cache: Path,
                  check=None) -> dict[str, np.ndarray]:
    """The train, dev and test token streams of --data: each document's ids, then end-of-text. Read from the
    cache when this data, tokenizer and split were tokenised before; else tokenised now and cached, after
    check(streams) has accepted them (so unusable data leaves no file behind)."""
    # The key covers all that shapes the streams: the data's bytes, the whole tokenizer.json and the split fractions
    # (not --seq-len: windows are cut from the streams when loaded). 20 hex digits are 80 bits.
    tok_digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    key = hashlib.sha256(f"{source_digest(path)}|{tok_digest}|{dev_fraction}|{test_fraction}".encode()).hexdigest()[:20]
    files = {s: cache / f"tokens-{key}-{s}.u32" for s in SPLITS}  # raw uint32 ids, no header
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--token-cache {cache}: not a directory that can be written ({e}); pass another") from None
    with locked(cache / f"tokens-{key}.lock"):  # one lock per key: other corpora tokenise in parallel
        if not all(f.is_file() for f in files.values()):  # checked under the lock: a waiter finds them written
            # Tokenised under temporary names, checked, then each published whole (fsync, rename): a crash leaves no
            # file or a whole one, and a set that lacks a split is tokenised again.
            tmp = {s: f.with_name(f.name + f".{os.getpid()}.tmp") for s, f in files.items()}
            try:
                tokenize(path, tokenizer, dev_fraction, test_fraction, tmp)
                if check is not None:
                    check({s: load_stream(f) for s, f in tmp.items()})  # raising here publishes nothing
                for s in SPLITS:
                    publish(tmp[s], files[s])
            finally:
                for f in tmp.values():  # the published ones are gone already (renamed)
                    f.unlink(missing_ok=True)
    return {s: load_stream(f) for s, f in files.items()}  # outside the lock: a complete set is never rewritten


def tokenize(path, tokenizer, dev_fraction: float, test_fraction: float, files: dict[str, Path]) -> None:
    """Streams the documents through the tokenizer's batch encoder, about 1 MB of text at a time, appending
    each split's uint32 ids to its file: memory stays at one chunk, whatever the corpus."""
    eos = eos_token_id(tokenizer)
    docs, tokens, t0 = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), time.time()
    # A document's own text "<|endoftext|>" stays text: only the ids appended here end a document.
    special, tokenizer.encode_special_tokens = tokenizer.encode_special_tokens, True
    outs = {s: open(f, "wb") for s, f in files.items()}  # one file per split, appended to chunk by chunk
    try:
        chunk, size = [], 0  # (split, text) pairs, and their characters
        for doc in read_documents(path):
            if not doc.text.strip():  # it would be a lone end-of-text
                continue
            chunk.append((split_of(doc, dev_fraction, test_fraction), doc.text))
            size += len(doc.text)  # characters, not bytes: 1 << 20 is about 1 MB of mostly-ASCII text
            if size >= 1 << 20:
                encode_chunk(chunk, tokenizer, eos, outs, docs, tokens)
                chunk, size = [], 0
                progress(docs, tokens, t0)
        encode_chunk(chunk, tokenizer, eos, outs, docs, tokens)  # the last, partial chunk
        progress(docs, tokens, t0, end="\n")  # ends the line that \r rewrote
    finally:
        tokenizer.encode_special_tokens = special  # the caller's tokenizer, as it was
        for f in outs.values():
            f.close()
    if not sum(docs.values()):  # no document, or only blank ones
        raise DataError(f"{path}: holds no text; pass --data with some documents")
    if not all(docs.values()):  # a split without documents has no window to train or score
        counts = ", ".join(f"{n} {s}" for s, n in docs.items())
        raise DataError(f"the {sum(docs.values())} documents split into {counts}; every split needs one, so use "
                        "more documents or larger --dev-fraction / --test-fraction")


def encode_chunk(chunk, tokenizer, eos: int, outs, docs, tokens) -> None:
    if not chunk:  # the corpus ended on a chunk boundary, or held nothing
        return
    # Rust encodes the batch in parallel threads; _fast skips the character offsets, which nothing here uses.
    for (split, _), enc in zip(chunk, tokenizer.encode_batch_fast([t for _, t in chunk])):
        # Every document ends with end-of-text, so a window that runs into the next one sees the boundary.
        ids = np.asarray(enc.ids + [eos], dtype=np.uint32)  # uint32: uint16 stops at 65,535, Qwen's ids pass 150,000
        outs[split].write(ids.tobytes())  # native byte order, as load_stream reads it back
        docs[split] += 1
        tokens[split] += len(ids)


def progress(docs, tokens, t0, end="") -> None:
    n = sum(tokens.values())
    print(f"\rtokenising: {sum(docs.values()):,} documents, {n:,} tokens "  # \r: the line is rewritten in place
          f"({', '.join(f'{s} {tokens[s]:,}' for s in SPLITS)}), {n / max(time.time() - t0, 1e-9):,.0f} tokens/s",
          end=end, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Windows.

class Windows:
    """Consecutive windows of seq_len + 1 tokens; sample k of the training order is window perm_e[k mod n]
    with a fresh seeded permutation each epoch e, so the data position is just a sample count."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, eos_id: int | None = None):
        self.tokens, self.seq_len, self.seed, self.eos_id = tokens, seq_len, seed, eos_id
        # seq_len + 1 tokens give seq_len inputs and their seq_len next-token targets. Windows overlap by one token,
        # so every token but the first (and a tail shorter than a window) is a target exactly once. n: the most
        # windows with n * seq_len + 1 <= len(tokens).
        self.n = (len(tokens) - 1) // seq_len
        self._perm = (None, None)  # (epoch, its permutation): one epoch's order, cached

    def window(self, i: int) -> np.ndarray:
        return self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1]  # (seq_len + 1,), a view

    def rows(self, indices) -> torch.Tensor:
        # int64: torch's index dtype for embedding lookups; np.stack copies the windows out of the read-only memmap,
        # which torch.from_numpy would warn about sharing.
        return torch.from_numpy(np.stack([self.window(j).astype(np.int64) for j in indices]))  # (len, seq_len + 1)

    def batch(self, start: int, size: int) -> torch.Tensor:
        indices = []
        for k in range(start, start + size):
            epoch, j = divmod(k, self.n)  # sample k is position j of that epoch's order
            if self._perm[0] != epoch:  # a batch may straddle two epochs
                # Seeded by (seed, epoch) alone: any sample's window follows from k, so resuming needs no RNG state.
                self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
            indices.append(self._perm[1][j])  # a window index in [0, n)
        return self.rows(indices)

    def spread(self, k: int, per_document: int = 0) -> list[int]:
        """k windows spaced evenly from the first to the last (every window when k is 0 or >= n), so an
        evaluation covers the whole split, not its first documents. per_document > 0 first keeps at most that many
        windows of each document (a window's document: that of its middle target token), spaced evenly over it,
        so that no long document holds most of the scored tokens."""
        candidates = np.arange(self.n)  # window indices
        if per_document > 0:
            # window j's targets are tokens j*seq_len + 1 .. j*seq_len + seq_len; middle: the document of its middle one
            middle = self._documents()[candidates * self.seq_len + self.seq_len // 2 + 1]
            starts = np.flatnonzero(np.diff(middle, prepend=-1))  # each document's first window
            # np.split cuts the windows into one run per document; linspace picks per_document of each run, evenly
            # spaced from its first window to its last (np.unique drops repeats when a run is shorter).
            keep = [run[np.unique(np.linspace(0, len(run) - 1, per_document).round().astype(int))]
                    for run in np.split(candidates, starts[1:])]
            candidates = np.concatenate(keep)
        if 0 < k < len(candidates):  # else every candidate is kept
            candidates = candidates[np.unique(np.linspace(0, len(candidates) - 1, k).round().astype(int))]
        return candidates.tolist()

    def coverage(self, k: int, per_document: int = 0) -> dict:
        """What an evaluation of spread(k, per_document) scores, for the table: windows, tokens and documents."""
        scored = self.spread(k, per_document)
        return dict(windows=len(scored), tokens=len(scored) * self.seq_len, documents=self.documents_in(scored),
                    split_windows=self.n, split_documents=int(np.count_nonzero(self.tokens == self.eos_id))) | (
            dict(windows_per_document=per_document) if per_document else {})

    def _documents(self) -> np.ndarray:
        if not hasattr(self, "_doc"):  # built on first use: only evaluation needs it, never training
            # _doc[i] counts the end-of-texts before token i, so a document's end-of-text belongs to it
            self._doc = np.concatenate(([0], np.cumsum(self.tokens == self.eos_id)))  # token i: document _doc[i]
        return self._doc

    def target_documents(self, indices) -> torch.Tensor:
        """(len(indices), seq_len): the document of each target token of the given windows."""
        return torch.from_numpy(np.stack([self._documents()[j * self.seq_len + 1: j * self.seq_len + self.seq_len + 1]
                                          for j in indices]))

    def documents_in(self, indices) -> int:
        """How many documents the given windows score a token of (each document ends with end-of-text)."""
        return len(torch.unique(self.target_documents(indices))) if len(indices) else 0


def windows_for(streams: dict[str, np.ndarray], seq_len: int, seed: int, vocab_size: int,
                eos_id: int) -> dict[str, Windows]:
    for split, ids in streams.items():
        if len(ids) < seq_len + 1:  # one window: seq_len inputs and one more token for the last target
            raise DataError(f"the {split} split has {len(ids)} tokens, fewer than one window of --seq-len "
                            f"{seq_len} + 1; add data or lower --seq-len")
        if int(ids.max()) >= vocab_size:  # else the embedding lookup fails deep inside the model
            raise DataError(f"token id {int(ids.max())} in the {split} data is beyond the model's vocabulary "
                            f"({vocab_size}); tokenise with the checkpoint's own tokenizer")
    return {s: Windows(ids, seq_len, seed, eos_id) for s, ids in streams.items()}


def splits(path, tokenizer, vocab_size: int, seq_len: int, seed: int, dev_fraction: float, test_fraction: float,
           cache: Path) -> dict[str, Windows]:
    """The train, dev and test windows of --data, each stream checked to fit the model and --seq-len."""
    eos = eos_token_id(tokenizer)
    streams = token_streams(path, tokenizer, dev_fraction, test_fraction, cache,
                            check=lambda s: windows_for(s, seq_len, seed, vocab_size, eos))  # before it is cached
    return windows_for(streams, seq_len, seed, vocab_size, eos)  # a cached stream may not fit this --seq-len


# ----------------------------------------------------------------------------------------------------------
# The demo's tokenizer: a byte-level BPE trained on the training split only.

def train_bpe(path, vocab_size: int, dev_fraction: float, test_fraction: float) -> Tokenizer:
    tok = Tokenizer(models.BPE())  # no unknown token: every byte has a symbol (the alphabet below)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no space added before the text
    tok.decoder = decoders.ByteLevel()  # byte symbols back to UTF-8 text
    # <|endoftext|> is the demo's end-of-document token (eos_token_id finds it); all 256 byte symbols are in the
    # vocabulary even where the training text lacks some, so any dev or test text encodes.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.text for d in read_documents(path)
                             if split_of(d, dev_fraction, test_fraction) == "train"), trainer)  # no dev or test text
    return tok


def demo_tokenizer(path, vocab_size: int, dev_fraction: float, test_fraction: float, cache: Path) -> Tokenizer:
    """The demo's BPE, trained on the training split only, and cached under a key of what it was trained on."""
    # Keyed by all that shapes the BPE: the data's bytes, the split (it sees the training text only) and its size.
    key = hashlib.sha256(f"{source_digest(path)}|{dev_fraction}|{test_fraction}|{vocab_size}".encode()).hexdigest()
    file = cache / f"tokenizer-{key[:16]}.json"
    if not file.is_file():
        print(f"training a {vocab_size}-token byte-level BPE on the training split")
        tokenizer = train_bpe(path, vocab_size, dev_fraction, test_fraction)
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write(file, lambda f: tokenizer.save(str(f)))  # temporary file, then rename: never half a file
    return Tokenizer.from_file(str(file))  # from the file, as every later run loads it
