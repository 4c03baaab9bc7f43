"""Corpus sources: expand globs into shards and stream documents out of them with a resumable cursor.

A *shard* is one file (plain text, JSONL, Parquet; ``.gz`` for text and JSONL) or one
``hf:`` spec read with ``datasets.load_dataset(..., streaming=True)``. Readers are generators
``read(shard, options, cursor, skips) -> Iterator[(text, cursor_after)]``; a cursor is a small
dict ``{"offset", "line", "doc"}`` (byte offset into the decompressed file or row index;
lines/rows consumed; documents yielded so far), so a reader reopened at ``cursor_after``
continues with the next document and nothing is re-read into memory.

Bad lines (invalid UTF-8, broken JSON, JSON without the text field) are skipped and counted
through :class:`SkipTracker`; with ``strict`` they raise :class:`~toolkit.errors.DataError`
naming the file and line.
"""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

from toolkit.errors import DataError

logger = logging.getLogger(__name__)

Cursor = Dict[str, int]
DocIterator = Iterator[Tuple[str, Cursor]]

# Extension (after stripping ".gz") -> reader kind, used by format "auto".
EXTENSION_KINDS: Dict[str, str] = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
}
# datasets packaged builder for file-like ``hf:`` specs, by extension.
HF_BUILDERS: Dict[str, str] = {
    ".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet",
    ".txt": "text", ".csv": "csv", ".arrow": "arrow",
}
MAX_LOGGED_SKIPS = 5
HF_BATCH = 256  # examples pulled from a datasets stream at a time
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Shard:
    """One unit of the corpus that a single reader streams.

    Attributes:
        kind: reader name, a key of :data:`READERS`.
        path: file path, or for ``hf`` the spec without the ``hf:`` prefix and split.
        split: dataset split for ``hf`` shards.
    """

    kind: str
    path: str
    split: str = "train"

    @property
    def name(self) -> str:
        """How the shard is named in messages and in resume fingerprints."""
        return f"hf:{self.path}#{self.split}" if self.kind == "hf" else self.path


@dataclass(frozen=True)
class ReadOptions:
    """Reader settings shared by every shard."""

    text_field: str = "text"
    doc_separator: str = "blank_line"


@dataclass
class SkipTracker:
    """Counts skipped lines by reason, logs the first few, raises in strict mode.

    Attributes:
        counts: reason -> number of skipped lines (the dict is shared with the stream's stats).
        strict: raise ``DataError`` instead of skipping.
        owns_line: decides whether this worker counts a skip at a line, so that workers that all
            read the same file (document-level sharding) count each bad line once overall.
    """

    counts: Dict[str, int] = field(default_factory=dict)
    strict: bool = False
    owns_line: Callable[[int], bool] = lambda line: True
    logged: int = 0

    def skip(self, reason: str, path: str, line: int, detail: str, hint: str) -> None:
        """Record (or in strict mode raise for) a bad line; ``line`` is 1-based."""
        if self.strict:
            raise DataError(path, detail, line=line, hint=hint)
        if not self.owns_line(line):
            return
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self.logged < MAX_LOGGED_SKIPS:
            self.logged += 1
            logger.warning("%s:%d: skipped (%s): %s", path, line, reason, detail)


def _is_glob(spec: str) -> bool:
    return any(c in _GLOB_CHARS for c in spec)


def _base_ext(path: str) -> str:
    stem = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(stem)[1].lower()


def parse_hf_spec(spec: str) -> Tuple[str, str]:
    """Split ``hf:<path>[#split]`` into ``(path, split)``; the split defaults to ``train``."""
    body = spec[3:] if spec.startswith("hf:") else spec
    path, _, split = body.partition("#")
    return path, (split or "train")


def _expand_files(spec: str, fmt: str) -> List[str]:
    path = os.path.expanduser(spec)
    if _is_glob(path):
        return [m for m in glob.glob(path, recursive=True) if os.path.isfile(m)]
    if os.path.isdir(path):
        found = [m for m in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(m)]
        # A folder under format "auto" may hold READMEs or indexes: keep only corpus files.
        return [m for m in found if fmt != "auto" or _base_ext(m) in EXTENSION_KINDS]
    return [path] if os.path.isfile(path) else []


def resolve_shards(specs: List[str], fmt: str = "auto", strict: bool = False) -> Tuple[List[Shard], List[str]]:
    """Expand source specs into a deterministic shard list.

    Files matched by any glob are de-duplicated and sorted by path; ``hf:`` specs follow in the
    order given. Empty files are left out (and reported), or rejected when ``strict``.

    Args:
        specs: paths, folders, globs (``corpus/**/*.jsonl.gz``) or ``hf:<path or dir>[#split]``.
        fmt: ``auto`` (by extension) or a reader kind applied to every file.
        strict: an empty file raises instead of being skipped.

    Returns:
        ``(shards, empty_files)``.

    Raises:
        DataError: a spec matches nothing, a file's format is unknown, or nothing is left.
    """
    files: set = set()
    hf: List[Shard] = []
    for spec in specs:
        if spec.startswith("hf:") or fmt == "hf":
            path, split = parse_hf_spec(spec)
            hf.append(Shard("hf", path, split))
            continue
        matched = _expand_files(spec, fmt)
        if not matched:
            raise DataError(spec, "corpus source matched no files",
                            hint="check the path or glob in corpus.sources (relative paths start at the working directory)")
        files.update(os.path.normpath(m) for m in matched)
    shards: List[Shard] = []
    empty: List[str] = []
    for path in sorted(files):
        kind = fmt if fmt != "auto" else EXTENSION_KINDS.get(_base_ext(path))
        if kind is None:
            raise DataError(path, f"cannot tell the corpus format from the extension '{_base_ext(path)}'",
                            hint=f"known: {', '.join(sorted(EXTENSION_KINDS))}; or set corpus.format")
        if os.path.getsize(path) == 0:
            if strict:
                raise DataError(path, "corpus file is empty", hint="remove it or set corpus.strict: false")
            empty.append(path)
            continue
        shards.append(Shard(kind, path))
    if empty:
        logger.warning("skipped %d empty corpus file(s), first: %s", len(empty), empty[0])
    shards.extend(hf)
    if not shards:
        raise DataError(specs[0] if specs else None, "every corpus file is empty",
                        hint="point corpus.sources at non-empty files")
    return shards, empty


def _open_binary(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # type: ignore[return-value]


def _decode(raw: bytes, path: str, line: int, skips: SkipTracker) -> Optional[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        skips.skip("invalid_utf8", path, line, f"line is not valid UTF-8 ({e.reason} at byte {e.start})",
                   "re-encode the file as UTF-8, or set corpus.strict: false to skip such lines")
        return None
    return text.lstrip("\ufeff") if line == 1 else text


def _lines(shard: Shard, cursor: Cursor, skips: SkipTracker) -> Iterator[Tuple[Optional[str], int, int]]:
    """Yield ``(decoded line or None, line number, offset after it)`` from ``cursor`` on."""
    offset, line = cursor["offset"], cursor["line"]
    try:
        with _open_binary(shard.path) as f:
            if offset:
                f.seek(offset)  # gzip seeks in decompressed bytes by re-reading; fine for resume.
            while True:
                raw = f.readline()
                if not raw:
                    return
                line += 1
                offset += len(raw)
                yield _decode(raw, shard.path, line, skips), line, offset
    except (OSError, EOFError) as e:
        # A truncated or corrupt .gz: the rest of the file is unreadable.
        skips.skip("unreadable_file", shard.path, line + 1, f"cannot read the rest of the file: {e}",
                   "re-create the file, or set corpus.strict: false to skip its unreadable tail")


def read_text(shard: Shard, opts: ReadOptions, cursor: Cursor, skips: SkipTracker) -> DocIterator:
    """Plain text: one document per line, or per block of lines separated by blank lines."""
    doc = cursor["doc"]
    if opts.doc_separator == "line":
        for text, line, offset in _lines(shard, cursor, skips):
            if text is not None and text.strip():
                doc += 1
                yield text.strip(), {"offset": offset, "line": line, "doc": doc}
        return
    block: List[str] = []
    last = dict(cursor)
    for text, line, offset in _lines(shard, cursor, skips):
        last = {"offset": offset, "line": line}
        if text is None:
            continue
        if text.strip():
            block.append(text.rstrip("\r\n"))
        elif block:
            doc += 1
            yield "\n".join(block), {"offset": offset, "line": line, "doc": doc}
            block = []
    if block:
        doc += 1
        yield "\n".join(block), {"offset": last["offset"], "line": last["line"], "doc": doc}


def _field_text(record: Any, opts: ReadOptions) -> Optional[str]:
    if isinstance(record, dict):
        value = record.get(opts.text_field)
        if isinstance(value, str):
            return value
    return None


_FIELD_HINT = "set corpus.text_field to the field holding the text, or set corpus.strict: false to skip such lines"


def read_jsonl(shard: Shard, opts: ReadOptions, cursor: Cursor, skips: SkipTracker) -> DocIterator:
    """JSON lines: one object per line, the document in ``opts.text_field``."""
    doc = cursor["doc"]
    for text, line, offset in _lines(shard, cursor, skips):
        if text is None or not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            skips.skip("invalid_json", shard.path, line, f"invalid JSON ({e.msg} at column {e.colno})",
                       "fix the line, or set corpus.strict: false to skip such lines")
            continue
        value = _field_text(record, opts)
        if value is None:
            skips.skip("missing_field", shard.path, line, f"no string field '{opts.text_field}' in the record",
                       _FIELD_HINT)
            continue
        doc += 1
        yield value, {"offset": offset, "line": line, "doc": doc}


def read_parquet(shard: Shard, opts: ReadOptions, cursor: Cursor, skips: SkipTracker) -> DocIterator:
    """Parquet: one document per row of column ``opts.text_field``, read one row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(shard.path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(shard.path, f"cannot open as Parquet: {e}", hint="check the file or corpus.format") from None
    if opts.text_field not in pf.schema_arrow.names:
        raise DataError(shard.path, f"no column '{opts.text_field}'; columns are {pf.schema_arrow.names}",
                        hint="set corpus.text_field")
    row, doc = cursor["offset"], cursor["doc"]
    first = 0  # row index where the current row group starts
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if first + n <= row:
            first += n
            continue
        values = pf.read_row_group(rg, columns=[opts.text_field]).column(0).to_pylist()
        for value in values[row - first:]:
            row += 1
            if not isinstance(value, str):
                skips.skip("missing_field", shard.path, row, f"row has no text in column '{opts.text_field}'",
                           _FIELD_HINT)
                continue
            doc += 1
            yield value, {"offset": row, "line": row, "doc": doc}
        first += n


def load_hf_stream(shard: Shard) -> Any:
    """Open an ``hf:`` shard with ``datasets.load_dataset(..., streaming=True)``.

    A path that is a file or a glob is read with the packaged builder for its extension
    (``json``, ``parquet``, ``text``, ``csv``); anything else (a local folder, a cached dataset
    name) goes to ``load_dataset`` as is.
    """
    import datasets

    path = os.path.expanduser(shard.path)
    try:
        if _is_glob(path) or os.path.isfile(path):
            files = sorted(glob.glob(path, recursive=True)) if _is_glob(path) else [path]
            builder = HF_BUILDERS.get(_base_ext(files[0])) if files else None
            if builder is None:
                raise DataError(shard.name, "matched no files with a known extension",
                                hint=f"known: {', '.join(sorted(HF_BUILDERS))}")
            return datasets.load_dataset(builder, data_files=files, split=shard.split, streaming=True)
        return datasets.load_dataset(path, split=shard.split, streaming=True)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (not found, offline, bad split): one message.
        raise DataError(shard.name, f"datasets.load_dataset failed: {type(e).__name__}: {e}",
                        hint="use a local folder or files; hub names only work when cached") from None


def read_hf(shard: Shard, opts: ReadOptions, cursor: Cursor, skips: SkipTracker) -> DocIterator:
    """A ``datasets`` streaming source; the cursor counts examples, resumed with ``skip``."""
    ds = load_hf_stream(shard)
    row, doc = cursor["offset"], cursor["doc"]
    if row:
        ds = ds.skip(row)
    # ``iter(batch_size=)`` rather than ``for record in ds``: inside a DataLoader worker plain
    # iteration re-shards by worker on its own, which would fight our sharding.
    for batch in ds.iter(batch_size=HF_BATCH):
        values = batch.get(opts.text_field)
        n = len(next(iter(batch.values()), []))
        for i in range(n):
            row += 1
            value = values[i] if values is not None else None
            if not isinstance(value, str):
                skips.skip("missing_field", shard.name, row, f"example has no string field '{opts.text_field}'",
                           _FIELD_HINT)
                continue
            doc += 1
            yield value, {"offset": row, "line": row, "doc": doc}


READERS: Dict[str, Callable[[Shard, ReadOptions, Cursor, SkipTracker], DocIterator]] = {
    "text": read_text,
    "jsonl": read_jsonl,
    "parquet": read_parquet,
    "hf": read_hf,
}


def start_cursor() -> Cursor:
    """The cursor at the start of any shard."""
    return {"offset": 0, "line": 0, "doc": 0}
