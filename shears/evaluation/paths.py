"""Where the data lives: a folder the caller names, else ``$SHEARS_DATA_DIR``."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$SHEARS_DATA_DIR``.

    Raises:
        FileNotFoundError: neither is given, or the folder/file does not exist.
    """
    path = path or os.environ.get("SHEARS_DATA_DIR")
    if not path:
        raise FileNotFoundError("no data folder: pass one (e.g. --data ../shared/data) or set "
                                "SHEARS_DATA_DIR")
    if not Path(path).exists():
        raise FileNotFoundError(f"data folder {path} does not exist")
    return Path(path)
