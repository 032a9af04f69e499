"""Files the pack writes or watches: one CSV writer, one JSON encoder, never-overwrite paths, user-given
file names, and the change signature of a watched file.

- CSV: every cell of user text that a spreadsheet would run as a formula (=, +, -, @, tab, CR first) is
  prefixed with an apostrophe; a file is only appended to when its header is exactly ours.
- JSON: NaN/inf become null (bare NaN is not JSON).
- Reports are created exclusively: an existing file is never overwritten.
- A watched file counts as changed when its size, mtime, ctime, inode or a hash of its first and last
  64 KiB differ: `cp -p` / `rsync -t` keep the mtime, not the ctime/inode/content.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import pathlib
from collections.abc import Iterable, Sequence

from .errors import InputError, quote

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
SIGNATURE_BYTES = 64 * 1024
MAX_NAME_BYTES = 200  # one path component (file systems allow 255; counters and suffixes are added)
MAX_PREFIX_CHARS = 1024


# ---------------------------------------------------------------- CSV

def csv_cell(value):
    """Text a spreadsheet would evaluate is written as text; numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def csv_header(path: str | os.PathLike) -> list[str] | None:
    """The first row of an existing CSV file (None when unreadable as text)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return next(csv.reader([handle.readline(1 << 16)]), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict], append: bool = False
              ) -> pathlib.Path:
    """Write rows under `columns`. New files are created exclusively (never overwritten). With `append`,
    an existing file whose header is exactly `columns` is appended to; otherwise the rows go to the first
    free `<stem>_<n><suffix>` beside it. Returns the path written."""
    path = pathlib.Path(path)
    columns = list(columns)
    candidate, number = path, 1
    while True:
        if append and candidate.exists() and csv_header(candidate) == columns:
            mode, header = "a", False
        elif not candidate.exists():
            mode, header = "x", True
        else:
            number += 1
            candidate = path.with_name(f"{path.stem}_{number}{path.suffix}")
            continue
        try:
            with open(candidate, mode, newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
                if header:
                    writer.writeheader()
                writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
            return candidate
        except FileExistsError:  # created meanwhile by someone else: take the next name
            continue


# ---------------------------------------------------------------- JSON

def json_ready(value):
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def json_text(value, **kwargs) -> str:
    return json.dumps(json_ready(value), allow_nan=False, **kwargs)


def jsonl_keys(path: str | os.PathLike) -> list[str] | None:
    """Keys of the first JSON-lines row of an existing file (None when it is not one)."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = json.loads(handle.readline(1 << 20))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return list(first) if isinstance(first, dict) else None


def append_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> pathlib.Path:
    """Append rows to a JSON-lines file whose rows have our keys, else to the first free `<stem>_<n>`."""
    path = pathlib.Path(path)
    keys = list(rows[0]) if rows else []
    candidate, number = path, 1
    while candidate.exists() and jsonl_keys(candidate) != keys:
        number += 1
        candidate = path.with_name(f"{path.stem}_{number}{path.suffix}")
    with open(candidate, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json_text(row) + "\n")
    return candidate


# ---------------------------------------------------------------- never overwrite

def create_new(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file that must not exist yet (FileExistsError otherwise)."""
    with open(path, "xb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)


def free_stem(folder: str | os.PathLike, stem: str, suffixes: Sequence[str]) -> str:
    """`stem`, or `stem_2`, `stem_3`, ... : the first for which no `<stem><suffix>` exists in `folder`."""
    folder = pathlib.Path(folder)
    candidate, number = stem, 1
    while any((folder / f"{candidate}{suffix}").exists() for suffix in suffixes):
        number += 1
        candidate = f"{stem}_{number}"
    return candidate


# ---------------------------------------------------------------- user-given names

def check_user_path(text: str, input_name: str) -> str:
    """A file name or prefix typed by a user: no NUL/control characters, components of sane length."""
    if not isinstance(text, str):
        raise InputError(f"expected text, got {type(text).__name__}", input_name)
    if len(text) > MAX_PREFIX_CHARS:
        raise InputError(f"expected a path of at most {MAX_PREFIX_CHARS} characters, got {len(text)}: "
                         f"{quote(text)}", input_name)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise InputError(f"expected a path without NUL or control characters, got {quote(text)}", input_name)
    for part in text.replace("\\", "/").split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise InputError(f"a file or folder name longer than {MAX_NAME_BYTES} bytes: {quote(part)}", input_name)
    return text


# ---------------------------------------------------------------- change detection

def file_signature(path: str | os.PathLike) -> tuple:
    """(resolved path, size, mtime_ns, ctime_ns, inode, hash of the first and last 64 KiB)."""
    resolved = pathlib.Path(path).resolve()
    st = resolved.stat()
    digest = hashlib.blake2b(digest_size=16)
    with open(resolved, "rb") as handle:
        digest.update(handle.read(SIGNATURE_BYTES))
        if st.st_size > SIGNATURE_BYTES:
            handle.seek(max(SIGNATURE_BYTES, st.st_size - SIGNATURE_BYTES))
            digest.update(handle.read(SIGNATURE_BYTES))
    return str(resolved), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest.hexdigest()
