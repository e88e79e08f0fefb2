"""The one precedence (docs/language.md): exact name > pattern > kind > default, and among rules
of the same rank the later one wins, across sections too."""
import pytest

from triton_dsl.lang.frontend import check_source

NET = "model M:\n    input [16]\n    layer fc1: linear(16)\n    layer fc2: linear(16)\n" \
      "    layer head: linear(4)\n"


def _table(rules, extra=""):
    r = check_source(NET + "precision:\n" + rules + extra, "m.tdsl")
    assert r.ok, r.diagnostics
    return {l.name: l.precision.to_source() for l in r.models[0].layers()}


@pytest.mark.parametrize("rules,want", [
    ("    default int8\n    default binary\n", None),  # a second default is an error, not a tie
    ("    kind linear: int8\n    kind linear: fp16\n", {"fc1": "fp16", "head": "fp16"}),
    ("    layer fc?: int8\n    layer fc*: fp16\n", {"fc1": "fp16", "fc2": "fp16", "head": "fp32"}),
    ("    layer fc*: fp16\n    layer fc?: int8\n", {"fc1": "int8", "fc2": "int8"}),
    ("    layer fc1: int8\n    layer fc1: fp16\n", {"fc1": "fp16", "fc2": "fp32"}),
])
def test_later_rule_of_the_same_rank_wins(rules, want):
    if want is None:
        assert [d.code for d in check_source(NET + "precision:\n" + rules).diagnostics
                if d.is_error] == ["E505"]
        return
    table = _table(rules)
    assert {k: table[k] for k in want} == want


def test_later_section_wins_too():
    table = _table("    layer fc1: int8\n", "precision M:\n    layer fc1: bf16\n")
    assert table["fc1"] == "bf16"


def test_rank_beats_order():
    table = _table("    layer fc1: int8\n    layer fc*: fp16\n    kind linear: bf16\n"
                   "    default binary\n")
    assert table == {"fc1": "int8", "fc2": "fp16", "head": "bf16"}


@pytest.mark.parametrize("rules,warned", [
    ("    default ternary\n", {"fc1", "head"}),
    ("    layer fc*: ternary\n    layer head: ternary\n", {"fc1"}),
    ("    default ternary\n    layer fc1: ternary\n", {"head"}),
    ("    default ternary\n    layer fc1: binary\n    layer head: int(bits=4)\n", set()),
])
def test_w601_only_for_low_bits_nobody_chose_by_name(rules, warned):
    """W601 (first and last layers below 8 bits) is for precisions that reach those layers
    through a default, kind or pattern rule; an exact rule for the layer is a decision."""
    r = check_source(NET + "precision:\n" + rules, "m.tdsl")
    assert r.ok
    got = {d.message.split("'")[1] for d in r.diagnostics if d.code == "W601"}
    assert got == warned
