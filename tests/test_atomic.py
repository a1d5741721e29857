"""shears.atomic: a write either lands whole or leaves the previous file untouched."""

import json
import os

import pytest

from shears import atomic


def test_write_json_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic.write_json(target, {"a": 1})
    atomic.write_json(target, {"b": [1, 2]})
    assert json.loads(target.read_text()) == {"b": [1, 2]}
    assert os.listdir(target.parent) == ["x.json"]


def test_a_failing_writer_keeps_the_previous_file(tmp_path):
    target = tmp_path / "w.bin"
    atomic.write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["w.bin"]


def test_read_json_names_a_truncated_file(tmp_path):
    target = tmp_path / "search.json"
    target.write_text('{"history": [1, 2')
    with pytest.raises(ValueError, match="search.json.*truncated"):
        atomic.read_json(target, "search result")


def _save(directory, files, **kw):
    with atomic.atomic_folder(directory, **kw) as stage:
        for name, text in files.items():
            (stage / name).write_text(text)


def test_atomic_folder_replaces_declares_last_and_removes_only_stale_files(tmp_path):
    order = []
    real = os.replace

    def spy(src, dst):
        order.append(os.path.basename(dst))
        real(src, dst)

    _save(tmp_path, {"w-1.bin": "old", "w-2.bin": "old", "decl.json": "{}"},
          declaring=["decl.json"])
    (tmp_path / "mine.txt").write_text("keep")
    os.replace = spy
    try:
        _save(tmp_path, {"w.bin": "new", "decl.json": '{"v": 2}'}, declaring=["decl.json"],
              stale=lambda n: n.startswith("w"))
    finally:
        os.replace = real
    assert order == ["w.bin", "decl.json"]
    assert sorted(os.listdir(tmp_path)) == ["decl.json", "mine.txt", "w.bin"]
    assert (tmp_path / "decl.json").read_text() == '{"v": 2}'


def test_atomic_folder_failure_leaves_the_folder_untouched(tmp_path):
    _save(tmp_path, {"w.bin": "old", "decl.json": "{}"}, declaring=["decl.json"])
    with pytest.raises(RuntimeError), atomic.atomic_folder(tmp_path, ["decl.json"]) as stage:
        (stage / "w.bin").write_text("half")
        raise RuntimeError("disk full")
    with pytest.raises(ValueError, match="declaring"):
        _save(tmp_path, {"w.bin": "new"}, declaring=["decl.json"])  # forgot the declaration
    assert sorted(os.listdir(tmp_path)) == ["decl.json", "w.bin"]
    assert (tmp_path / "w.bin").read_text() == "old"


def test_placeholder_is_refused_by_json_readers_and_leftovers_are_cleared(tmp_path):
    (tmp_path / "config.json").write_bytes(atomic.PLACEHOLDER)  # as a kill leaves it
    (tmp_path / (atomic.TMP_PREFIX + "stage.x")).mkdir()
    (tmp_path / (atomic.TMP_PREFIX + "a.json.y")).write_text("half")
    with pytest.raises(ValueError, match="config.json marks a save that was interrupted"):
        atomic.read_json(tmp_path / "config.json", "model config")
    with pytest.raises(json.JSONDecodeError):  # what transformers and vLLM parse it with
        json.loads((tmp_path / "config.json").read_text())
    _save(tmp_path, {"config.json": "{}"}, declaring=["config.json"], placeholder=True)
    assert os.listdir(tmp_path) == ["config.json"]
    assert atomic.read_json(tmp_path / "config.json") == {}
