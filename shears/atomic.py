"""Atomic file writes: after a crash a file is its previous complete version or its new one.

Every writer of shears goes through here. A file is written under a temporary name in
its own folder (same file system, so the rename is atomic), flushed and fsynced, then
``os.replace``d over the target, and the folder is fsynced so that the rename itself
survives a power loss. A writer that produces several files stages them with
``atomic_folder``, which removes the file that declares the format first, moves the data
in, and writes the declaring file last: after a crash the folder holds the previous
complete save or no declaring file, never new data under an old declaration (see
``docs/architecture.md``).

This module imports nothing of shears, so that every room may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

TMP_PREFIX = ".shears-tmp-"
# What atomic_folder(placeholder=True) puts in a declaring file while the data is moved in:
# not JSON, so that every loader refuses the folder (transformers: "not a valid JSON file")
# instead of taking defaults, and a person who opens it reads why.
PLACEHOLDER = (b"shears: this folder is being written, or its write was interrupted (kill, "
               b"crash, full disk) before this file was; the other files may not belong "
               b"together. Save again into this folder, or restore a complete copy.\n")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Write the file at the yielded path (e.g. ``safetensors.torch.save_file(t, tmp)``). If
    the block raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed it without fsync
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, **kwargs: Any) -> None:
    """``json.dumps(obj, **kwargs)`` written to ``path`` atomically (``indent=2`` default)."""
    kwargs.setdefault("indent", 2)
    write_text(path, json.dumps(obj, **kwargs))


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse the JSON file ``path``; a truncated or corrupt file raises a ``ValueError``
    that names it (``what`` says what it was meant to be), not a bare ``JSONDecodeError``."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(PLACEHOLDER[:40]):
        raise ValueError(f"{what} {path} marks a save that was interrupted before it was "
                         "written (shears.atomic.atomic_folder): the folder's other files may "
                         "not belong together. Save again, or restore a complete copy")
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}); it may be truncated by an "
                         "interrupted write: delete it or restore it from a backup") from e


def _remove_leftovers(directory: Path, keep: Path) -> None:
    """Delete what an interrupted write of shears left in ``directory`` (``TMP_PREFIX`` names:
    temporary files and staging folders; nothing else is touched)."""
    for entry in directory.iterdir():
        if entry.name.startswith(TMP_PREFIX) and entry != keep:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_folder(
    directory: str | os.PathLike,
    declaring: Sequence[str],
    stale: Callable[[str], bool] | None = None,
    placeholder: bool = False,
) -> Iterator[Path]:
    """Yield an empty staging folder inside ``directory``: write every file of one save there;
    when the block ends, the staged files replace their namesakes in ``directory``.

    ``declaring`` names the file(s) that say what the folder holds (``config.json``,
    ``adapter_config.json``): a loader starts from them. The commit order makes a crash at any
    moment leave either the previous complete save or a folder without its declaring file,
    which every loader refuses, never new data under an old declaration:

    1. every staged file is fsynced; what an earlier interrupted write of shears left in
       ``directory`` (``TMP_PREFIX`` names) is deleted;
    2. the declaring files are removed from ``directory`` or, with ``placeholder``, replaced by
       :data:`PLACEHOLDER` (made durable before step 4). Use ``placeholder`` when a
       loader given a folder without the file would carry on with defaults: transformers'
       ``LlamaForCausalLM.from_pretrained`` builds a default ``LlamaConfig`` when there is no
       ``config.json``; a placeholder that is not JSON makes it refuse;
    3. the files for which ``stale(name)`` is true and that this save does not write
       (e.g. the shards of an earlier sharded save) are removed;
    4. the other staged files are ``os.replace``d in, and the folder fsynced;
    5. the declaring files last; the folder fsynced, the staging folder removed.

    If the block raises (or a declaring file was not staged: ``ValueError``), the staging
    folder is removed and ``directory`` is left as it was. Flat saves only (no subfolders).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "stage.", dir=directory))
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        missing = [n for n in declaring if n not in names]
        if missing or any((stage / n).is_dir() for n in names):
            raise ValueError(f"atomic_folder: declaring files {missing} were not written, or "
                             f"a subfolder was staged, in {stage}")
        for name in names:
            _fsync_file(stage / name)
        _commit(directory, stage, names, declaring, stale, placeholder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _commit(directory: Path, stage: Path, names: list[str], declaring: Sequence[str],
            stale: Callable[[str], bool] | None, placeholder: bool) -> None:
    """Steps 1-5 of :func:`atomic_folder` (the staged files are already fsynced)."""
    _remove_leftovers(directory, keep=stage)
    for name in declaring:
        if placeholder:
            write_bytes(directory / name, PLACEHOLDER)
        else:
            (directory / name).unlink(missing_ok=True)
    fsync_dir(directory)
    if stale is not None:
        for entry in directory.iterdir():
            if entry.is_file() and entry.name not in names and stale(entry.name):
                entry.unlink()
    for name in [n for n in names if n not in declaring]:
        os.replace(stage / name, directory / name)
    fsync_dir(directory)
    for name in declaring:
        os.replace(stage / name, directory / name)
    fsync_dir(directory)
