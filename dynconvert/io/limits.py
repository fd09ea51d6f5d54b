"""The one bounded reader of the JSON files dynconvert reads (records, ``run.json``, a diffusers
``config.json``, a shard index, a latents index).

Its limits (:class:`dynconvert.fields.ParseLimits`) are checked before anything is built from
the data: the size before the file is read, an upper bound of the number of values and UTF-8
before it is parsed, integers of at most 40 digits while it is parsed, then depth, number of
values and length of each string. Each refusal is one error of the caller's class, whose
message is cut before it is built.

Example:
    >>> parse_json(b'{"a": [1, 2]}', "x.json")
    {'a': [1, 2]}
    >>> parse_json(b"[" * 100 + b"]" * 100, "x.json")
    Traceback (most recent call last):
    ...
    dynconvert.errors.FileError: x.json is nested more than 32 deep; it is not a file ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dynconvert.errors import DynconvertError, FileError
from dynconvert.fields import RECORD_LIMITS, ParseLimits, shown
from dynconvert.io.files import read_bytes


class _TooBig(ValueError):
    """An integer past the digit limit, raised while parsing."""


def parse_json(
    data: bytes,
    where: str | os.PathLike,
    error: type[DynconvertError] = FileError,
    limits: ParseLimits = RECORD_LIMITS,
) -> Any:
    """Parse JSON bytes within ``limits`` (the module says which, in which order).

    Raises:
        error: The bytes are too many, not UTF-8, not JSON, or past a limit; the message names
            the file and the limit.

    Example:
        >>> parse_json(b"[1e400]", "x.json")
        [inf]
    """
    fix = "it is not a file dynconvert wrote, or it is corrupt"
    if len(data) > limits.bytes:
        raise error(f"{where} is larger than {limits.bytes} bytes; {fix}")
    # Each value (keys included) but the first follows one of [ { , : so their count bounds
    # the values from above, counted in C before the parser builds a million objects (64 MB
    # of "[0,0,..." took 19 s and 1.2 GB to refuse after parsing).
    if sum(data.count(c) for c in (b",", b"[", b"{", b":")) + 1 > limits.nodes:
        raise error(f"{where} holds more than {limits.nodes} values; {fix}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where} is not UTF-8 text (byte {e.start}); {fix}") from None

    def bounded_int(digits: str) -> int:
        if len(digits) > limits.int_digits + 1:
            raise _TooBig(f"an integer of {len(digits)} digits (at most {limits.int_digits})")
        return int(digits)

    try:
        value = json.loads(text, parse_int=bounded_int)
    except _TooBig as e:
        raise error(f"{where} holds {e}; {fix}") from None
    except RecursionError:
        raise error(f"{where} is nested more than {limits.depth} deep; {fix}") from None
    except ValueError as e:  # JSONDecodeError is one: a short message with line and column
        raise error(f"{where} is not valid JSON ({shown(str(e), 120)}); {fix}") from None
    check_shape(value, where, error, limits)
    return value


def check_shape(
    value: Any,
    where: str | os.PathLike,
    error: type[DynconvertError] = FileError,
    limits: ParseLimits = RECORD_LIMITS,
) -> None:
    """Refuse parsed data deeper, larger or with longer strings than ``limits`` allow.

    Shared containers (YAML aliases) count once per use, so the count bounds any later walk.

    Example:
        >>> check_shape({"a": ["x" * 10]}, "x.json")
    """
    fix = "it is not a file dynconvert wrote, or it is corrupt"
    stack = [(value, 1)]
    count = 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > limits.nodes:
            raise error(f"{where} holds more than {limits.nodes} values; {fix}")
        if isinstance(item, str) and len(item) > limits.string:
            raise error(f"{where} holds a string of {len(item)} characters; {fix}")
        if isinstance(item, (dict, list)):
            if depth >= limits.depth:
                raise error(f"{where} is nested more than {limits.depth} deep; {fix}")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            if len(children) > limits.nodes:
                raise error(f"{where} holds more than {limits.nodes} values; {fix}")
            stack.extend((child, depth + 1) for child in children)


def read_json(
    path: str | os.PathLike,
    error: type[DynconvertError] = FileError,
    limits: ParseLimits = RECORD_LIMITS,
    root: str | os.PathLike | None = None,
) -> Any:
    """Read and parse a JSON file within ``limits``, no link followed (``files.open_file``).

    Raises:
        error: The file is missing, a link, not a regular file, or its data is refused by
            :func:`parse_json`.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp()); (folder / "a.json").write_text("[1]")
        3
        >>> read_json(folder / "a.json", root=folder)
        [1]
    """
    return parse_json(read_bytes(path, limits.bytes, root, error), Path(path), error, limits)
