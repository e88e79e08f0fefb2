"""Checkpoints of existing models quantized by rules files: saved in the checkpoint format of
compiled models, loaded into a freshly built model, refused for one whose modules differ."""
import pytest
import torch
from torch import nn

import triton_dsl
from triton_dsl import checkpoint
from triton_dsl import runtime as rt
from test_external_modules import RULES, X, Net, _net


def _quantized(frozen=True):
    net = _net()
    triton_dsl.quantize(net, RULES)
    triton_dsl.quantize(net, "precision:\n    layer head: binary\n")  # a second section
    return rt.freeze(net) if frozen else net


@pytest.mark.parametrize("frozen", [True, False])
def test_reload_into_a_fresh_model(tmp_path, frozen):
    net = _quantized(frozen)
    with torch.no_grad():
        want = net.eval()(X)
    path = str(tmp_path / "q.safetensors")
    size = checkpoint.save_quantized(net, path)
    torch.manual_seed(123)  # other random weights: the file's must replace them
    fresh = checkpoint.load_quantized(path, Net())
    assert isinstance(fresh.head, rt.FrozenLinear if frozen else rt.Linear)
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), want)
    if frozen:  # packed: the ternary and binary layers take 2 and 1 bits, not 32
        assert size < 0.6 * sum(p.numel() * 4 for p in _net().parameters())


def test_refuses_models_whose_modules_differ(tmp_path):
    path = str(tmp_path / "q.safetensors")
    checkpoint.save_quantized(_quantized(), path)
    with pytest.raises(checkpoint.CheckpointError, match="saved from a test_external_modules.Net"
                       ", not a torch.nn.modules.linear.Linear"):
        checkpoint.load_quantized(path, nn.Linear(3, 3))
    longer = Net()
    longer.blocks.append(nn.Sequential(nn.Linear(32, 48)))
    with pytest.raises(checkpoint.CheckpointError, match="'blocks.2.0.*the checkpoint does not"):
        checkpoint.load_quantized(path, longer)
    wider = Net()
    wider.head = nn.Linear(32, 11)
    with pytest.raises(checkpoint.CheckpointError, match="has shape"):
        checkpoint.load_quantized(path, wider)
    renamed = Net()
    renamed.top = renamed.head
    del renamed.head
    with pytest.raises(checkpoint.CheckpointError, match="its rules do not fit this model.*"
                       "no module is named 'head'"):
        checkpoint.load_quantized(path, renamed)
    with pytest.raises(checkpoint.CheckpointError, match="already quantized"):
        checkpoint.load_quantized(path, _quantized())


def test_the_two_kinds_of_checkpoint_are_not_confused(tmp_path):
    path = str(tmp_path / "q.safetensors")
    checkpoint.save_quantized(_quantized(), path)
    with pytest.raises(checkpoint.CheckpointError, match="load_quantized"):
        checkpoint.load(path)
    with pytest.raises(TypeError, match="triton_dsl.quantize"):
        checkpoint.save_quantized(_net(), path)


def test_corruption_is_caught(tmp_path):
    path = tmp_path / "q.safetensors"
    checkpoint.save_quantized(_quantized(), str(path))
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256"):
        checkpoint.load_quantized(str(path), Net())


def test_stored_rules_are_text_never_a_path_to_read(tmp_path):
    """A crafted checkpoint whose rules entry is a file name: the loader must not read that
    file (here a valid rules file, which the old reader would have applied)."""
    import json
    from safetensors.torch import save as st_save
    from triton_dsl.workflow.checkpoint_format import digest
    path = str(tmp_path / "q.safetensors")
    checkpoint.save_quantized(_quantized(), path)
    tensors, meta = checkpoint.read(path)
    elsewhere = tmp_path / "rules.tdsl"
    elsewhere.write_text(RULES)
    ext = json.loads(meta["external"])
    ext["rules"] = [str(elsewhere)]
    meta = dict(meta, external=json.dumps(ext))
    meta["sha256"] = digest(meta, tensors)
    crafted = tmp_path / "crafted.safetensors"
    crafted.write_bytes(st_save(tensors, metadata=meta))
    with pytest.raises(checkpoint.CheckpointError, match="its rules do not fit"):
        checkpoint.load_quantized(str(crafted), Net())
