"""Rules files resolved against existing modules, without torch: the one rule engine
(lang/rules.py) over plain records, with the precedence and the messages of compiled models."""
import pytest

from triton_dsl.lang.diagnostics import TdslError
from triton_dsl.lang.external import Module, parse_rules, plan, read_rules
from triton_dsl.lang.diagnostics import suggest_pattern

# a Llama-like model as the runtime would describe it (lang/external.Module records)
MODULES = [Module("model.embed_tokens", "Embedding", why="which precision rules cannot select")]
for i in range(2):
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        MODULES.append(Module(f"model.layers.{i}.self_attn.{p}", "Linear", (64, 64)))
    for p, shape in (("gate_proj", (128, 64)), ("up_proj", (128, 64)), ("down_proj", (64, 128))):
        MODULES.append(Module(f"model.layers.{i}.mlp.{p}", "Linear", shape))
    MODULES.append(Module(f"model.layers.{i}.input_layernorm", "LlamaRMSNorm",
                          why="which precision rules cannot select"))
    MODULES.append(Module(f"model.layers.{i}", "LlamaDecoderLayer",
                          why="which holds other modules"))
MODULES += [Module("model.norm", "LlamaRMSNorm", why="which precision rules cannot select"),
            Module("lm_head", "Linear", (256, 64)),
            Module("conv", "Conv2d", (8, 27), True, dynamic_ok=False),
            Module("transformer.h.0.attn.c_attn", "Conv1D", (192, 64), True),
            Module("odd", "Conv2d", (8, 27), problem="padding_mode='reflect'")]


def _plan(text):
    return plan(parse_rules(text, "r.tdsl"), MODULES)


def _errors(text):
    with pytest.raises(TdslError) as e:
        _plan(text)
    return e.value


def test_precedence_matches_compiled_models():
    """exact > pattern > kind > default; later among equals; unselected modules kept."""
    p = _plan("precision:\n    default int8\n    kind Conv1D: fp16\n"
              "    layer model.layers.*.mlp.*: ternary\n    layer model.layers.1.mlp.*: binary\n"
              "    layer model.layers.0.mlp.down_proj: int(bits=4)\n    layer lm_head: skip\n"
              "    layer odd: skip\n")
    src = {e.name: e.precision.to_source() if e.precision else "skip" for e in p.entries}
    assert src["model.layers.0.mlp.up_proj"] == "ternary"
    assert src["model.layers.1.mlp.up_proj"] == "binary"
    assert src["model.layers.0.mlp.down_proj"] == "int(bits=4)"
    assert src["model.layers.0.self_attn.q_proj"] == "int8"
    assert src["transformer.h.0.attn.c_attn"] == "fp16"
    assert src["lm_head"] == "skip" and src["odd"] == "skip"
    assert p["conv"].name == "int8"


def test_without_a_default_unselected_modules_stay_as_they_are():
    p = _plan("precision:\n    kind Conv1D: int8\n")
    assert [e.name for e in p.quantized] == ["transformer.h.0.attn.c_attn"]
    assert p["lm_head"] is None


def test_sizes_and_totals():
    p = plan(parse_rules("precision:\n    layer lm_head: ternary\n"),
             [Module("lm_head", "Linear", (256, 64), bits=32)], other_bytes=100)
    d = p.to_dict()
    assert d["modules"][0]["bytes"] == 256 * 16 + 4 * 256  # 2-bit codes + a scale per row
    assert d["original_bytes"] == 256 * 64 * 4 + 100
    assert d["total_bytes"] == 256 * 16 + 4 * 256 + 100
    assert "compression" in p.render()


@pytest.mark.parametrize("rule,code,col,help_", [
    ("layer model.layer.*.mlp.*: int8", "E503", 11, "did you mean 'model.layers.*.mlp.*'?"),
    ("layer model.layers.0.mlp.up_prj: int8", "E503", 11,
     "did you mean 'model.layers.0.mlp.up_proj'?"),
    ("layer lm_haed: skip", "E503", 11, "did you mean 'lm_head'?"),
    ("kind Linaer: int8", "E201", 10, "did you mean 'Linear'?"),
    ("kind LlamaRMSNorm: int8", "E504", 10, "precision applies to: Linear, Conv2d, Conv1D"),
    ("layer model.norm: int8", "E503", 11, "precision applies to: Linear, Conv2d, Conv1D"),
    ("layer odd: ternary", "E511", 16, "keep it as it is with a rule `layer odd: skip`"),
    ("layer conv: int8(activations=dynamic)", "E509", 17, None),
    ("default int4", "E501", 13, "write int(bits=4) for 4-bit integer weights"),
    ("default skp", "E501", 13, "did you mean 'skip'?"),
    ("default skip(x=1)", "E301", 13, "write skip alone"),
    ("layer lm_head: int(bits=4, group_size=48)", "E508", 43, None),
])
def test_each_bad_rule_is_one_positioned_error(rule, code, col, help_):
    e = _errors("precision:\n    " + rule + "\n")
    (d,) = e.diagnostics
    assert (d.code, d.line, d.col) == (code, 2, col), str(e)
    if help_:
        assert d.help == help_
    assert "r.tdsl:2:" in str(e)


def test_every_problem_reported_at_once():
    e = _errors("precision:\n    layer nothing: int8\n    kind Nope: int8\n    default int9\n")
    assert [d.code for d in e.diagnostics] == ["E503", "E201", "E501"]


def test_an_overridden_rule_is_not_blamed():
    """odd cannot be replaced; the default would pick it, but the exact skip wins."""
    _plan("precision:\n    default int8\n    layer odd: skip\n")
    assert _errors("precision:\n    default int8\n").diagnostics[0].code == "E511"


@pytest.mark.parametrize("text,msg", [
    ("model M:\n    input [4]\n    layer fc: linear(4)\n", "declares a model"),
    ("precision M:\n    default int8\n", "names a model"),
    ("# nothing\n", "no precision section"),
])
def test_rules_files_hold_only_unnamed_precision_sections(text, msg):
    r = parse_rules(text, "r.tdsl")
    assert not r.ok and msg in r.diagnostics[0].message and r.diagnostics[0].code == "E513"


def test_skip_is_for_existing_modules_only():
    from triton_dsl.lang.frontend import check_source
    r = check_source("model M:\n    input [4]\n    layer fc: linear(4)\nprecision:\n"
                     "    layer fc: skip\n")
    assert [d.code for d in r.diagnostics] == ["E512"]


def test_read_rules_takes_a_path_or_text(tmp_path):
    f = tmp_path / "r.tdsl"
    f.write_text("precision:\n    default int8\n")
    assert read_rules(str(f)).ok and read_rules(f).ok and read_rules(f.read_text()).ok
    missing = read_rules(str(tmp_path / "none.tdsl"))
    assert missing.diagnostics[0].code == "E100"


def test_sequential_names_start_with_digits():
    p = plan(parse_rules("precision:\n    layer 0: int8\n    layer 2*: ternary\n"),
             [Module("0", "Linear", (4, 4)), Module("2", "Linear", (4, 4))])
    assert [e.precision.name for e in p.entries] == ["int8", "ternary"]


def test_suggest_pattern_fixes_one_dotted_part():
    names = ["stem", "stage1.0.conv1", "stage2.conv1"]
    assert suggest_pattern("stage9.*.conv1", names) == "did you mean 'stage1.*.conv1'?"
    assert suggest_pattern("zzz.*", names) is None
