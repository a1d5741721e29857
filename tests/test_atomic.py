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
