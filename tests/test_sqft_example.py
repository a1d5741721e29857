"""examples/sqft.py --smoke: prune -> quantize -> QA-NLS -> search -> merge -> export ->
plain transformers reload, on a tiny random Llama (seconds)."""

import pytest
import sqft

pytest.importorskip("compressed_tensors")


def test_smoke_ships_an_exact_int4_sparse_model(tmp_path):
    results = sqft.main(["--smoke", "--out", str(tmp_path)])
    assert results["on_grid"] and results["zeros_kept"]
    assert results["merged_diff"] < 1e-5  # the merged model computes what was trained
    assert results["reload_diff"] == 0.0  # plain transformers reload, bit for bit
    assert 0.25 < results["packed_ratio"] < 0.35  # 4 bits + one fp32 scale per 32 entries
    assert (tmp_path / "int4" / "config.json").exists()
