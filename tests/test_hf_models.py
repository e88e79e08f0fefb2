"""Real models, offline: Hugging Face Llama and ResNet built from small configs with random
weights (examples/hf_models.py), quantized by rules files, frozen, reloaded and run. Needs the
`hf` extra (transformers), which scripts/setup.sh installs; skipped without it."""
import copy
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

import triton_dsl  # noqa: E402
from triton_dsl import checkpoint  # noqa: E402
from triton_dsl import runtime as rt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)
from hf_models import tiny_llama, tiny_resnet  # noqa: E402

LLAMA_RULES = os.path.join(EXAMPLES, "hf_llama_rules.tdsl")
RESNET_RULES = os.path.join(EXAMPLES, "hf_resnet_rules.tdsl")
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 3]])


@pytest.fixture(autouse=True)
def cpu_paths(monkeypatch):
    """The CPU deployment paths (native kernel, torch int8), not the Triton interpreter: what a
    user of these models runs, and fast enough for generate()."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_llama_plan():
    p = triton_dsl.plan(tiny_llama(), LLAMA_RULES)
    prec = {e.name: e.precision.to_source() if e.precision else "skip" for e in p.entries}
    assert prec["model.layers.1.mlp.up_proj"] == "ternary(threshold=absmean, scale=absmean)"
    assert prec["model.layers.0.mlp.down_proj"] == "int8"
    assert prec["model.layers.0.self_attn.q_proj"] == "int8"
    assert prec["lm_head"] == "skip"
    assert len(p.entries) == 2 * 7 + 1 and len(p.quantized) == 14
    d = p.to_dict()
    assert d["other_bytes"] > 256 * 64 * 4  # the embedding and the norms, kept as they are
    assert d["total_bytes"] < d["original_bytes"] / 2


def test_misspelt_names_in_a_real_model():
    with pytest.raises(triton_dsl.TdslError) as e:
        triton_dsl.plan(tiny_llama(), "precision:\n    layer model.layer.*.mlp.*: int8\n"
                        "    layer model.norm: int8\n    kind Conv1D: int8\n")
    text = str(e.value)
    assert "<rules>:2:11: error[E503]" in text and "did you mean 'model.layers.*.mlp.*'?" in text
    assert "<rules>:3:11: error[E503]: 'model.norm' is a LlamaRMSNorm module" in text
    assert "<rules>:4:10: error[E503]: rule matches no module: the model has no Conv1D" in text


def _close(got, want, frac):
    err = (got - want).abs().max().item()
    span = (want.max() - want.min()).item()
    assert err < frac * span, f"max error {err:.4g} is {err / span:.2%} of the span {span:.4g}"


def test_llama_int8_weight_only_is_close_to_float():
    """int8 per-channel weights everywhere, head included: logits within 2% of their span."""
    model = tiny_llama()
    with torch.no_grad():
        want = model(PROMPT).logits
    triton_dsl.quantize(model, "precision:\n    default int8\n")
    rt.freeze(model)
    with torch.no_grad():
        _close(model(PROMPT).logits, want, 0.02)


def test_resnet_int8_weight_only_is_close_to_float():
    model = tiny_resnet()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).logits
    p = triton_dsl.quantize(model, RESNET_RULES)
    assert p["resnet.embedder.embedder.convolution"] is None  # skip
    assert p["resnet.encoder.stages.1.layers.0.shortcut.convolution"].name == "int8"
    assert p["classifier.1"].name == "int8"
    rt.freeze(model)
    assert isinstance(model.classifier[1], rt.FrozenLinear)
    with torch.no_grad():
        _close(model(x).logits, want, 0.02)


def test_llama_mixed_plan_freezes_reloads_and_generates(tmp_path):
    float_model = tiny_llama()
    model = copy.deepcopy(float_model)
    triton_dsl.quantize(model, LLAMA_RULES)
    rt.freeze(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, rt.FrozenLinear)
    with torch.no_grad():
        out = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
        logits = model(PROMPT).logits
    assert out.shape == (1, PROMPT.shape[1] + 6) and torch.equal(out[:, :6], PROMPT)
    path = str(tmp_path / "llama.safetensors")
    size = checkpoint.save_quantized(model, path)
    again = checkpoint.load_quantized(path, tiny_llama(seed=1))  # other random weights
    with torch.no_grad():
        torch.testing.assert_close(again(PROMPT).logits, logits)
        assert torch.equal(again.generate(PROMPT, max_new_tokens=6, do_sample=False), out)
    fp32 = sum(p.numel() * 4 for p in float_model.parameters())
    assert size < 0.7 * fp32  # the projections packed; embedding and head kept in fp32


def test_frozen_resnet_compiles(monkeypatch):
    torch._dynamo.reset()
    model = tiny_resnet()
    triton_dsl.quantize(model, RESNET_RULES)
    rt.freeze(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x).logits
        got = torch.compile(model, backend="aot_eager")(x).logits
    torch.testing.assert_close(got, want)


def test_frozen_llama_compiles_in_one_graph():
    """Each frozen projection is one custom op (runtime/compile_ops.py): no graph break."""
    torch._dynamo.reset()
    model = tiny_llama()
    triton_dsl.quantize(model, LLAMA_RULES)
    rt.freeze(model)
    with torch.no_grad():
        want = model(PROMPT).logits
        assert torch._dynamo.explain(model)(PROMPT).graph_break_count == 0
        got = torch.compile(model, backend="aot_eager")(PROMPT).logits
    torch.testing.assert_close(got, want)


def test_cli_plan_on_the_example(run_cli, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    code, out, err = run_cli("plan", "examples/hf_llama_rules.tdsl", "--model",
                             "examples.hf_models:tiny_llama")
    assert code == 0, err
    assert out.startswith("LlamaForCausalLM with examples/hf_llama_rules.tdsl: 14 of 15 modules")


def test_example_script_runs(capsys):
    import hf_quantize
    assert hf_quantize.main(["--tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM with" in out and "frozen generates:" in out
