"""Names and paths that come from users: validated so nothing can escape the data folder.

Run folders are named by generated ids (never by the user's run name); uploads and exports are stored under
generated names too. These helpers are the single place where a user-influenced string becomes a path.
"""

from __future__ import annotations

import re
import secrets
import time
import unicodedata
from pathlib import Path

DEFAULT_DATA_DIR = "studio_data"  # app.py's --data-dir and python -m studio's
RUN_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
MAX_NAME = 80


class UnsafePathError(ValueError):
    """A name or path would leave the data folder (``../``, an absolute path, a symlink)."""


def new_run_id(now: float | None = None) -> str:
    """Sortable, unguessable id: 20251129-204512-a1b2c3."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + "-" + secrets.token_hex(3)


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID.match(run_id):
        raise UnsafePathError(f"not a run id: {str(run_id)[:40]!r}")
    return run_id


def clean_name(name: str) -> str:
    """A display name for a run: 1-80 printable characters, no path separators, no '..'.

    Names never become paths, but they are still refused if they look like one, so that no later code can be
    tricked into using them as such."""
    name = unicodedata.normalize("NFC", str(name or "")).strip()
    if not name:
        raise ValueError("run name: must not be empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"run name: at most {MAX_NAME} characters (got {len(name)})")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise ValueError("run name: control characters are not allowed")
    if "/" in name or "\\" in name or ".." in name or name.startswith((".", "~")):
        raise UnsafePathError("run name: '/', '\\', '..' and a leading '.' or '~' are not allowed")
    return name


def inside(root: Path, *parts: str) -> Path:
    """``root/parts...``, guaranteed to lie inside ``root`` with no symlink anywhere below ``root``.

    Raises UnsafePathError for absolute parts, ``..`` components or a symlink on the way."""
    root = Path(root).resolve()
    path = root
    for part in parts:
        p = Path(part)
        if p.is_absolute() or p.drive or any(c in ("..", "") for c in p.parts) or not p.parts:
            raise UnsafePathError(f"path {part!r} is not a plain relative name")
        for comp in p.parts:
            path = path / comp
            if path.is_symlink():
                raise UnsafePathError(f"{path.name!r} is a symbolic link; refusing to follow it")
    if root != path.resolve() and root not in path.resolve().parents:
        raise UnsafePathError(f"{path} is outside {root}")
    return path
