"""Issue 17 §2, §3: the grid of quantize_base survives save_pretrained -> from_pretrained ->
load_grid, and load_adapter refuses adapters whose base grid state is not the model's.

References: the saved model's own weights, scales and logits (a round trip must give them
back bit for bit), an independent count of the groups a QA merge moved off max|q| = 7, and a
hand-written fake quantizer (test_qa_sparse.hand_fake_quant)."""

import json

import numpy as np
import pytest
import torch
import transformers as T
from test_qa_sparse import TARGETS, hand_fake_quant, qa_model
from tiny import make_tiny, random_ids, randomize_adapters

import shears
from shears.adapters import elastic_modules
from shears.pruning.layers import weight_matrix
from shears.quantization import grid_of, quantized_modules


def reload(directory, **kw):
    return T.AutoModelForCausalLM.from_pretrained(directory, **kw).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def groups_off_qmax(model, qmax=7):
    """Groups whose largest |q| is not qmax (computed here from weight and scale): a merge
    left them below it, or at -8 (the far end of [-8, 7])."""
    count = 0
    for m in quantized_modules(model).values():
        g = grid_of(m)
        q = (weight_matrix(m).float() / g.scale.float().repeat_interleave(g.group_size, 1))
        absmax = q.round().abs().reshape(q.shape[0], -1, g.group_size).amax(-1)
        count += int((absmax != qmax).sum())
    return count


@pytest.fixture
def merged_dir(tmp_path):
    model = qa_model()
    shears.merge_adapters(model)
    assert groups_off_qmax(model) > 0  # a fresh round-to-nearest would pick other scales
    saved = {n: (weight_matrix(m).clone(), grid_of(m).scale.clone())
             for n, m in quantized_modules(model).items()}
    model.save_pretrained(tmp_path / "merged")
    return tmp_path / "merged", model, saved


def test_plain_from_pretrained_gets_the_same_weights(merged_dir):
    directory, model, saved = merged_dir
    again = reload(directory)
    ids = random_ids()
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0)
    for name, (w, _) in saved.items():
        assert torch.equal(weight_matrix(again.get_submodule(name)), w)
    assert not quantized_modules(again)  # plain transformers knows nothing of the grid


def test_load_grid_restores_the_saved_grid_and_export_is_exact(merged_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    directory, model, saved = merged_dir
    again = reload(directory)
    assert shears.load_grid(again, directory) is again
    assert set(quantized_modules(again)) == set(saved)
    for name, (w, s) in saved.items():
        g = grid_of(again.get_submodule(name))
        assert (g.bits, g.group_size) == (4, 32) and torch.equal(g.scale, s)
        assert torch.equal(weight_matrix(again.get_submodule(name)), w)
    shears.export_compressed(again, tmp_path / "int4")
    ids = random_ids()
    torch.testing.assert_close(logits(reload(tmp_path / "int4"), ids), logits(model, ids),
                               rtol=0, atol=0)


def test_quantize_base_refuses_to_regrid_a_checkpoint_saved_on_a_grid(merged_dir):
    directory, _, saved = merged_dir
    again = reload(directory)
    with pytest.raises(ValueError, match=r"INT4.*group size 32.*load_grid") as e:
        shears.quantize_base(again, group_size=32)
    assert "shears_grid" in str(e.value)
    assert not quantized_modules(again)
    for name, (w, _) in saved.items():
        assert torch.equal(weight_matrix(again.get_submodule(name)), w)


def test_quantize_base_moved_weights_before_this_fix(merged_dir):
    """What the refusal prevents: re-gridding the reloaded weights by round to nearest moves
    weights of every group a merge left off max|q| = 7 (the issue's thousands)."""
    directory, _, saved = merged_dir
    again = reload(directory)
    del again.config.shears_grid  # what an old checkpoint looks like: no record, no refusal
    shears.quantize_base(again, group_size=32)
    moved = sum(int((weight_matrix(again.get_submodule(n)) != w).sum())
                for n, (w, _) in saved.items())
    assert moved > 1000


def test_load_grid_refusals_change_nothing(merged_dir, tmp_path):
    directory, _, saved = merged_dir
    name = next(iter(saved))
    changed = reload(directory)  # a weight moved after saving: no longer on the saved grid
    with torch.no_grad():
        weight_matrix(changed.get_submodule(name))[0, 0] += 1e-3
    with pytest.raises(ValueError, match=f"{name}.*not on the saved grid"):
        shears.load_grid(changed, directory)
    assert not quantized_modules(changed)
    cast = reload(directory, dtype=torch.bfloat16)  # loaded in another dtype
    with pytest.raises(ValueError, match="dtype"):
        shears.load_grid(cast, directory)
    assert not quantized_modules(cast)
    gridded = reload(directory)
    shears.load_grid(gridded, directory)
    with pytest.raises(ValueError, match="already"):
        shears.load_grid(gridded, directory)
    plain = make_tiny("llama")
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no grid"):
        shears.load_grid(reload(tmp_path / "plain"), tmp_path / "plain")
    # a record without the scales (the state dict lost them): named, not silently skipped
    config = json.loads((directory / "config.json").read_text())
    no_scales = tmp_path / "no_scales"
    reload(tmp_path / "plain").save_pretrained(no_scales)
    (no_scales / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weight_scale"):
        shears.load_grid(reload(no_scales), no_scales)


def test_the_record_follows_the_grid(tmp_path):
    model = make_tiny("llama")
    assert getattr(model.config, "shears_grid", None) is None
    shears.quantize_base(model, bits=8, group_size=16)
    record = model.config.to_dict()["shears_grid"]
    assert record["maps"] == {n: [8, 16] for n in quantized_modules(model)}
    for m in quantized_modules(model).values():  # a dense merge would forget grids like this
        shears.quantization.clear_grid(m)
    assert model.config.to_dict()["shears_grid"] is None
    model.save_pretrained(tmp_path)
    shears.quantize_base(reload(tmp_path), group_size=32)  # nothing recorded: allowed


def test_a_grid_recorded_on_a_submodule_loads_by_one_prefix(tmp_path):
    model = make_tiny("llama")
    shears.quantize_base(model.model, group_size=32)  # names relative to model.model
    assert all(n.startswith("layers.") for n in model.config.to_dict()["shears_grid"]["maps"])
    model.save_pretrained(tmp_path)  # tensors named relative to model
    again = reload(tmp_path)
    shears.load_grid(again, tmp_path)
    for name, m in quantized_modules(model).items():
        assert torch.equal(grid_of(again.get_submodule(name)).scale, grid_of(m).scale)


def test_a_deep_copy_merged_densely_records_no_stale_grid(tmp_path):
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = copy.deepcopy(qa_model(sparse=False))  # the copy's config entry is plain
        shears.merge_adapters(model, keep_sparsity=False)  # forgets every grid
    assert not quantized_modules(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["shears_grid"] is None


# §3: the base's grid state in the adapter layout

def _base_dir(tmp_path, bits=4, group=32, grid=True):
    model = make_tiny("llama")
    shears.wanda_prune(model, method="magnitude", sparsity=0.5, progress=False)
    if grid:
        shears.quantize_base(model, bits=bits, group_size=group)
    d = tmp_path / f"base{bits}_{group}_{grid}"
    model.save_pretrained(d)
    return d


def _adapters(base_dir, tmp_path, sparse=True):
    model = reload(base_dir)
    if getattr(model.config, "shears_grid", None):
        shears.load_grid(model, base_dir)
    shears.add_elastic_lora(model, TARGETS, ranks=[8, 6, 4], alpha=16, sparse_adapter=sparse)
    randomize_adapters(model, b_scale=0.05)
    shears.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_layout_records_the_base_grid(tmp_path):
    model, adapter = _adapters(_base_dir(tmp_path, 8, 16), tmp_path)
    saved = json.loads((adapter / "super_adapter_config.json").read_text())["base_grid"]
    assert saved == {n: [8, 16] for n, _ in elastic_modules(model)}
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["shears_super_adapter"]["base_grid"] == saved


@pytest.mark.parametrize("bits", [4, 8])
def test_qa_adapters_refuse_the_base_reloaded_without_its_grid(tmp_path, bits):
    base = _base_dir(tmp_path, bits)
    model, adapter = _adapters(base, tmp_path)
    ids = random_ids()
    expected = logits(model, ids)
    again = reload(base)  # the same base, weights bit-identical, but no grid
    with pytest.raises(ValueError, match=rf"INT{bits} grid, group size 32.*no grid.*load_grid"):
        shears.load_adapter(again, adapter)
    assert not list(elastic_modules(again))
    shears.load_grid(again, base)
    shears.load_adapter(again, adapter)
    torch.testing.assert_close(logits(again, ids), expected, rtol=0, atol=0)


def test_int8_qa_adapters_refuse_the_unquantized_pruned_base(tmp_path):
    """INT8 rounding is too fine for the fingerprint to see: the grid state must."""
    _, adapter = _adapters(_base_dir(tmp_path, 8), tmp_path)
    unquantized = reload(_base_dir(tmp_path, grid=False))
    with pytest.raises(ValueError, match=r"INT8 grid, group size 32.*no grid"):
        shears.load_adapter(unquantized, adapter)
    # loading anyway attaches plain SparsePEFT adapters: another function
    shears.load_adapter(unquantized, adapter, check_base=False)
    reference = reload(_base_dir(tmp_path / "again", 8))
    shears.load_grid(reference, _base_dir(tmp_path / "again", 8))
    shears.load_adapter(reference, adapter)
    ids = random_ids()
    assert not torch.allclose(logits(unquantized, ids), logits(reference, ids), atol=1e-3)


def test_adapters_refuse_another_grid_and_plain_adapters_refuse_a_grid(tmp_path):
    _, adapter = _adapters(_base_dir(tmp_path, 4, 32), tmp_path / "a")
    other = reload(_base_dir(tmp_path, 4, 16))
    shears.load_grid(other, _base_dir(tmp_path, 4, 16))
    with pytest.raises(ValueError, match=r"INT4 grid, group size 32.*INT4 grid, group size 16"):
        shears.load_adapter(other, adapter, check_base=True)
    _, plain = _adapters(_base_dir(tmp_path, grid=False), tmp_path / "b")  # SparsePEFT
    gridded = reload(_base_dir(tmp_path, 8, 16))
    shears.load_grid(gridded, _base_dir(tmp_path, 8, 16))
    with pytest.raises(ValueError, match=r"no grid.*INT8 grid, group size 16"):
        shears.load_adapter(gridded, plain)
    assert not list(elastic_modules(gridded))


def test_dense_adapters_do_not_depend_on_the_grid(tmp_path):
    """A dense adapter's forward is base(x) + update whatever the grid: no refusal."""
    base = _base_dir(tmp_path)
    with pytest.warns(UserWarning, match="sparse_adapter=False over a base quantized"):
        model, adapter = _adapters(base, tmp_path, sparse=False)
    ids = random_ids()
    again = reload(base)
    shears.load_adapter(again, adapter)
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0)


def test_files_without_the_grid_field_still_load(tmp_path):
    base = _base_dir(tmp_path)
    model, adapter = _adapters(base, tmp_path)
    path = adapter / "super_adapter_config.json"
    meta = json.loads(path.read_text())
    del meta["base_grid"]
    path.write_text(json.dumps(meta))
    again = reload(base)  # assumed to match the base it is loaded onto: unchecked
    shears.load_adapter(again, adapter)
    assert len(list(elastic_modules(again))) == len(list(elastic_modules(model)))


def test_adapted_checkpoint_round_trip_through_save_pretrained(tmp_path):
    """save_pretrained of a QA model: base on its grid, scales and super-adapter together;
    plain from_pretrained + load_grid + load_adapter give back the same function."""
    model = qa_model()
    ids = random_ids()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "ckpt")
    again = reload(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="load_grid"):
        shears.load_adapter(again, tmp_path / "ckpt")
    shears.load_grid(again, tmp_path / "ckpt")
    shears.load_adapter(again, tmp_path / "ckpt")
    torch.testing.assert_close(logits(again, ids), expected, rtol=0, atol=0)
    for _, m in elastic_modules(again):
        w = m.base_weight().detach().numpy()
        np.testing.assert_array_equal(w, hand_fake_quant(w, grid_of(m.base_layer).scale.numpy()))
