"""Kill a writer at a chosen moment, for real: SIGKILL from the parent, nothing cleaned up.

``run_killed(writer, *args, kill_at=...)`` runs ``writer(*args)`` in a child process. Before
the writer starts, the child arms one kill point (a function patched in the child only):
when the writer reaches it, the child tells the parent and waits; the parent sends SIGKILL
and checks that the child died of it. No ``finally``, ``except`` or ``atexit`` of the writer
runs, as after ``kill -9`` or a power cut (short of the page cache). Then the test checks what
the next load makes of the folder.

Kill points (``kill_at``):

- ``on_replace(name, before=True, nth=1)``: at the ``nth`` ``os.replace`` whose target is
  called ``name``; ``before`` the rename (the new file is complete under its temporary
  name: the worst moment inside ``shears.atomic``) or just after it.
- ``on_call("module:attr", before=True, nth=1)``: at the ``nth`` call of a function, e.g.
  ``"transformers.modeling_utils:safe_save_file"`` (the name as the caller looks it up) or
  ``"pkg.module:Class.method"``; with ``before=False`` just after it returns.

Children are forked from a ``multiprocessing`` forkserver that has imported torch,
transformers and shears once, so a case costs a fork (milliseconds), not a 4 s interpreter
start. ``writer`` and ``args`` travel by pickle: module-level functions, plain values.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PRELOAD = ["torch", "transformers", "safetensors.torch", "shears"]
_CONTEXT = None


@dataclass(frozen=True)
class KillPoint:
    """Where the child is killed (see the module docstring)."""

    kind: str  # "replace" or "call"
    target: str  # a file name, or "module:attr"
    before: bool = True
    nth: int = 1


def on_replace(name: str, before: bool = True, nth: int = 1) -> KillPoint:
    return KillPoint("replace", name, before, nth)


def on_call(target: str, before: bool = True, nth: int = 1) -> KillPoint:
    return KillPoint("call", target, before, nth)


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _wait_to_be_killed(reached) -> None:
    reached.set()
    time.sleep(120)  # the parent kills us long before
    os._exit(3)  # never reached unless the parent died


def _arm(point: KillPoint, reached) -> None:
    """Patch the kill point into this (child) process."""
    if point.kind == "replace":
        real = os.replace
        hits = [0]

        def replace(src, dst, *args, **kwargs):
            hits[0] += os.path.basename(os.fspath(dst)) == point.target
            hit = hits[0] == point.nth and os.path.basename(os.fspath(dst)) == point.target
            if hit and point.before:
                _wait_to_be_killed(reached)
            real(src, dst, *args, **kwargs)
            if hit:
                _wait_to_be_killed(reached)

        os.replace = replace
        return
    module_name, path = point.target.split(":")
    owner = importlib.import_module(module_name)
    *parents, attr = path.split(".")  # "Class.method" patches the class
    for name in parents:
        owner = getattr(owner, name)
    real_fn = getattr(owner, attr)
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        hit = calls[0] == point.nth
        if hit and point.before:
            _wait_to_be_killed(reached)
        out = real_fn(*args, **kwargs)
        if hit:
            _wait_to_be_killed(reached)
        return out

    setattr(owner, attr, wrapped)


def _child(writer: Callable[..., Any], args: tuple, point: KillPoint, reached) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    _arm(point, reached)
    writer(*args)


def run_killed(writer: Callable[..., Any], *args: Any, kill_at: KillPoint,
               timeout: float = 120.0) -> None:
    """Run ``writer(*args)`` in a child and SIGKILL it at ``kill_at``.

    ``AssertionError`` if the writer finished (or failed) without reaching the kill point, or
    if the child did not die of the SIGKILL.
    """
    ctx = _context()
    reached = ctx.Event()
    child = ctx.Process(target=_child, args=(writer, args, kill_at, reached), daemon=True)
    child.start()
    deadline = time.monotonic() + timeout
    while not reached.wait(0.02):
        if not child.is_alive():
            child.join()
            raise AssertionError(f"{writer.__name__} ended (exit code {child.exitcode}) "
                                 f"without reaching the kill point {kill_at}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"{writer.__name__} did not reach {kill_at} in {timeout} s")
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL, f"child exit code {child.exitcode}"
