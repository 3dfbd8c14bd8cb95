"""Names are data, never paths: one sanitiser for every file named after a symbol, signal, run or user value.

A symbol read from a CSV can be ``x/../../../../tmp/ESCAPED``; used as is in ``forecast_<symbol>.png`` it writes
outside the output folder. :func:`safe_filename` turns any value into one plain file-name component (letters,
digits, ``-``, ``_`` and inner dots; never empty, ``.`` or ``..``; at most 100 characters) and appends a short
hash of the original whenever it had to change it, so that two different values never share a file.
:func:`path_in` joins a folder and such a name and checks that the resolved path stays inside the folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

from kronos.errors import InputError

MAX_NAME = 100
_UNSAFE = re.compile(r"[^\w.-]+", re.UNICODE)  # \w keeps CJK and other letters readable
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def safe_filename(value: Any, fallback: str = "item") -> str:
    """One file-name component for ``value``: unchanged when already plain, else cleaned plus ``-<hash8>``."""
    text = str(value)
    cleaned = _UNSAFE.sub("_", unicodedata.normalize("NFKC", text)).strip("._") or fallback
    if cleaned.split(".")[0].lower() in _RESERVED:
        cleaned = "_" + cleaned
    if cleaned != text or len(cleaned) > MAX_NAME:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        cleaned = f"{cleaned[: MAX_NAME - 9]}-{digest}"
    return cleaned


def path_in(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, raising InputError when it would resolve outside ``folder`` (``..``, links, absolute)."""
    base = Path(folder)
    path = base / name
    root = base.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise InputError(f"refusing to write '{name}': it resolves to {resolved}, outside the folder {root}")
    return path


__all__ = ["MAX_NAME", "path_in", "safe_filename"]
