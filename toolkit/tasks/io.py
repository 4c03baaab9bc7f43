"""File reading helpers shared by the task loaders.

Every reader reports problems as :class:`toolkit.errors.DataError` naming the file and the
1-based line, so a bad row in a 400k-line GLUE file is one readable message. Rows come back
as :class:`Record` objects that remember where they were read from; ``record.get(key)``
raises a DataError naming the file, line and missing column instead of an IndexError.

TSV files are split on tabs with no quote handling (``csv.QUOTE_NONE`` semantics), because
GLUE's QQP and MNLI contain unbalanced quote characters. Lines are split on ``\\n`` only
(a stray ``\\r`` inside a field stays in the field), so line numbers match ``sed -n Np``.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from toolkit.errors import DataError, ToolkitError

PathLike = Union[str, Path]
_REQUIRED = object()

# File extension -> table format used when a config does not name one.
FORMAT_BY_SUFFIX = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass
class Record:
    """One row of a table or one JSON object, with its origin for error messages.

    Attributes:
        path: the file it came from.
        line: 1-based line number in that file.
        data: the column values (list) or the parsed JSON object (dict).
        columns: header name -> column index, for tables with a header.
    """

    path: Path
    line: int
    data: Union[List[str], Dict[str, Any]]
    columns: Optional[Dict[str, int]] = None

    def get(self, key: Union[str, int], default: Any = _REQUIRED) -> Any:
        """Value of column ``key`` (header name or 0-based index) or JSON field ``key``.

        Raises:
            DataError: naming the file, line and key when it is absent and no default is given.
        """
        if isinstance(self.data, dict):
            if key in self.data:
                return self.data[key]
            if str(key) in self.data:
                return self.data[str(key)]
            if default is not _REQUIRED:
                return default
            raise DataError(self.path, f"missing field {key!r} (fields here: {', '.join(map(str, self.data))})",
                            line=self.line)
        idx = self._index(key)
        if idx is not None and 0 <= idx < len(self.data):
            return self.data[idx]
        if default is not _REQUIRED:
            return default
        if idx is None:
            raise DataError(self.path, f"no column named {key!r} in the header "
                            f"({', '.join(self.columns or {})})", line=self.line)
        raise DataError(self.path, f"row has {len(self.data)} columns, expected at least {idx + 1} "
                        f"(column {key!r})", line=self.line,
                        hint="check for missing tabs/commas or an unescaped line break")

    def _index(self, key: Union[str, int]) -> Optional[int]:
        if isinstance(key, int) and not isinstance(key, bool):
            return key
        if self.columns is not None and key in self.columns:
            return self.columns[key]
        if self.columns is None and isinstance(key, str) and key.lstrip("-").isdigit():
            return int(key)
        return None


def require_file(path: PathLike, what: str = "data file") -> Path:
    """Return ``path`` as a Path; DataError naming it if it is not an existing file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, f"{what} not found" if not p.exists() else f"{what} is not a regular file")
    return p


def _decode(raw: bytes, path: Path, line: int, encoding: str) -> str:
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(path, f"cannot decode as {encoding}: {e.reason} at byte {e.start}", line=line,
                        hint="set the right 'encoding' or re-save the file as UTF-8") from None
    except LookupError:
        raise DataError(path, f"unknown text encoding {encoding!r}") from None
    if line == 1 and text.startswith("\ufeff"):
        text = text[1:]  # byte order mark written by some editors
    return text.rstrip("\n").rstrip("\r")


def iter_lines(path: PathLike, encoding: str = "utf-8") -> Iterator[Tuple[int, str]]:
    """Yield ``(line_number, text)`` for every line, without its line ending.

    Splits on ``\\n`` only so that line numbers are those of ``wc -l`` / editors.
    """
    p = require_file(path)
    with p.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            yield n, _decode(raw, p, n, encoding)


def read_tsv(path: PathLike, header: bool = True, min_columns: Optional[int] = None,
             encoding: str = "utf-8") -> Tuple[Optional[List[str]], List[Record]]:
    """Read a tab-separated file without quote processing.

    Args:
        path: the file.
        header: the first line names the columns.
        min_columns: rows with fewer columns raise DataError(file, line).
        encoding: text encoding.

    Returns:
        ``(header_names or None, records)``; empty lines are skipped.
    """
    p = require_file(path)
    names: Optional[List[str]] = None
    columns: Optional[Dict[str, int]] = None
    rows: List[Record] = []
    for n, text in iter_lines(p, encoding):
        if header and names is None:
            names = [c.strip() for c in text.split("\t")]
            columns = {c: i for i, c in enumerate(names)}
            continue
        if not text.strip():
            continue
        values = text.split("\t")
        if min_columns is not None and len(values) < min_columns:
            raise DataError(p, f"row has {len(values)} tab-separated columns, expected {min_columns}", line=n,
                            hint="check for missing tabs or an unescaped line break")
        rows.append(Record(p, n, values, columns))
    if header and names is None:
        raise DataError(p, "file is empty (expected a header line)")
    return names, rows


def read_csv(path: PathLike, header: bool = True, min_columns: Optional[int] = None, delimiter: str = ",",
             encoding: str = "utf-8") -> Tuple[Optional[List[str]], List[Record]]:
    """Read a CSV file with standard quoting (fields may span lines).

    Returns:
        ``(header_names or None, records)``; a record's line is where the row starts.
    """
    p = require_file(path)
    names: Optional[List[str]] = None
    columns: Optional[Dict[str, int]] = None
    rows: List[Record] = []
    enc = "utf-8-sig" if encoding.lower().replace("_", "-") == "utf-8" else encoding
    try:
        with p.open("r", encoding=enc, newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            start = 1
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise DataError(p, f"malformed CSV: {e}", line=reader.line_num) from None
                line, start = start, reader.line_num + 1
                if header and names is None:
                    names = [c.strip() for c in values]
                    columns = {c: i for i, c in enumerate(names)}
                    continue
                if not values or all(not v.strip() for v in values):
                    continue
                if min_columns is not None and len(values) < min_columns:
                    raise DataError(p, f"row has {len(values)} columns, expected {min_columns}", line=line)
                rows.append(Record(p, line, values, columns))
    except UnicodeDecodeError as e:
        raise DataError(p, f"cannot decode as {encoding}: {e.reason}",
                        hint="set the right 'encoding' or re-save the file as UTF-8") from None
    except LookupError:
        raise DataError(p, f"unknown text encoding {encoding!r}") from None
    if header and names is None:
        raise DataError(p, "file is empty (expected a header line)")
    return names, rows


def read_jsonl(path: PathLike, encoding: str = "utf-8") -> List[Record]:
    """Read one JSON object per line; blank lines are skipped.

    Raises:
        DataError: naming the file and line of unparsable JSON or a non-object value.
    """
    p = require_file(path)
    out: List[Record] = []
    for n, text in iter_lines(p, encoding):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(p, f"invalid JSON: {e.msg} (column {e.colno})", line=n) from None
        if not isinstance(obj, dict):
            raise DataError(p, f"expected a JSON object per line, got {type(obj).__name__}", line=n)
        out.append(Record(p, n, obj))
    return out


def read_json(path: PathLike, encoding: str = "utf-8") -> Any:
    """Parse a whole JSON document; syntax errors name the file and line."""
    p = require_file(path)
    try:
        text = p.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise DataError(p, f"cannot decode as {encoding}: {e.reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(p, f"invalid JSON: {e.msg} (column {e.colno})", line=e.lineno) from None


def read_table(path: PathLike, fmt: str, header: bool = True,
               encoding: str = "utf-8") -> Tuple[Optional[List[str]], List[Record]]:
    """Read ``path`` as ``fmt`` (``tsv``, ``csv`` or ``jsonl``) into records."""
    readers = {
        "tsv": lambda: read_tsv(path, header=header, encoding=encoding),
        "csv": lambda: read_csv(path, header=header, encoding=encoding),
        "jsonl": lambda: (None, read_jsonl(path, encoding=encoding)),
    }
    if fmt not in readers:
        raise DataError(path, f"unknown table format {fmt!r}; use one of {', '.join(readers)}")
    return readers[fmt]()


def write_tsv(path: PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write a tab-separated file (parent folders created); tabs/newlines in values are replaced."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)

    def clean(v: Any) -> str:
        return str(v).replace("\t", " ").replace("\r", " ").replace("\n", " ")

    with p.open("w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(clean(v) for v in row) + "\n")
    return p


def read_index_predictions(path: PathLike, keys: Sequence[Any],
                           header_names: Sequence[Tuple[str, ...]] = (("index", "id"), ("prediction", "label")),
                           encoding: str = "utf-8") -> List[Tuple[str, int]]:
    """Read an ``index<TAB>prediction`` submission file aligned with ``keys``.

    Args:
        path: the submission file (first line ``index\\tprediction``).
        keys: the expected indices in example order (compared as strings).
        header_names: accepted names of the two header columns.

    Returns:
        ``(raw_prediction, line)`` per key, in the order of ``keys``.

    Raises:
        DataError: naming the file and the first duplicate, unknown or missing index.
    """
    p = require_file(path, "prediction file")
    lines = iter_lines(p, encoding)
    try:
        _, head = next(lines)
    except StopIteration:
        raise DataError(p, "prediction file is empty (expected a header 'index\\tprediction')") from None
    cols = [c.strip().lower() for c in head.split("\t")]
    if len(cols) < 2 or cols[0] not in header_names[0] or cols[1] not in header_names[1]:
        raise DataError(p, f"bad header {head!r}; expected 'index\\tprediction'", line=1)
    wanted = {str(k): i for i, k in enumerate(keys)}
    found: Dict[str, Tuple[str, int]] = {}
    for n, text in lines:
        if not text.strip():
            continue
        parts = text.split("\t")
        if len(parts) < 2:
            raise DataError(p, "expected 'index<TAB>prediction'", line=n)
        idx, value = parts[0].strip(), parts[1].strip()
        if idx in found:
            raise DataError(p, f"duplicate index {idx!r} (first at line {found[idx][1]})", line=n)
        if idx not in wanted:
            raise DataError(p, f"unknown index {idx!r}: no such example in the gold data", line=n,
                            hint="was this file written for another split or task?")
        found[idx] = (value, n)
    for k in keys:
        if str(k) not in found:
            raise DataError(p, f"missing prediction for index {str(k)!r} "
                            f"({len(keys) - len(found)} of {len(keys)} missing)")
    return [found[str(k)] for k in keys]


# ----- prediction values in "index<TAB>prediction" files, by task type -------------------------
def _fmt_label(value: Any) -> str:
    return str(value)


def _fmt_float(value: Any) -> str:
    x = float(value)
    if not math.isfinite(x):
        raise ToolkitError(f"refusing to write the non-finite prediction {x!r}: the model's output is not finite")
    return f"{x:.5f}"


def _fmt_tags(value: Any) -> str:
    return " ".join(str(v) for v in value)


def _fmt_choice(value: Any) -> str:
    return str(int(value))


def _parse_label(text: str, labels: Optional[Sequence[str]], path: Path, line: int) -> str:
    if labels is not None and text not in labels:
        raise DataError(path, f"prediction {text!r} is not one of the labels ({', '.join(labels)})", line=line)
    return text


def _parse_float(text: str, labels: Optional[Sequence[str]], path: Path, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(path, f"prediction {text!r} is not a number", line=line) from None
    # nan / inf parse as floats but make every correlation meaningless (numpy would return 0 or nan).
    if not math.isfinite(value):
        raise DataError(path, f"prediction {text!r} is not a finite number", line=line,
                        hint="the model produced nan/inf; fix the run that wrote this file")
    return value


def _parse_tags(text: str, labels: Optional[Sequence[str]], path: Path, line: int) -> List[str]:
    tags = text.split()
    for t in tags:
        _parse_label(t, labels, path, line)
    return tags


def _parse_choice(text: str, labels: Optional[Sequence[str]], path: Path, line: int) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(path, f"prediction {text!r} is not a choice index (0, 1, ...)", line=line) from None


# task type -> (format for writing, parse for reading); keys are toolkit.tasks.base task types.
PREDICTION_CODECS = {
    "classification": (_fmt_label, _parse_label),
    "regression": (_fmt_float, _parse_float),
    "token_classification": (_fmt_tags, _parse_tags),
    "multiple_choice": (_fmt_choice, _parse_choice),
}


def format_prediction(task_type: str, value: Any) -> str:
    """One prediction as submission text: label, ``%.5f`` float, space-joined tags or choice index."""
    return PREDICTION_CODECS[task_type][0](value)


def parse_prediction(task_type: str, text: str, labels: Optional[Sequence[str]], path: PathLike,
                     line: int) -> Any:
    """Inverse of :func:`format_prediction`; DataError(file, line) for values outside ``labels``."""
    return PREDICTION_CODECS[task_type][1](text, labels, Path(path), line)
