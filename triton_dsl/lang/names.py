"""Which names a .tdsl file may give its models and layers, and how unnamed layers get theirs.

A layer's name becomes an attribute of the generated nn.Module (``self.fc1``) and its state-dict
key, so it must not shadow what PyTorch or the compiled model's base class already defines: a layer
called ``check_input`` would silently replace the input check. A model's name becomes a class in
the generated module, so it must not shadow what that module imports or the builtins it calls.
Rather than rename (state-dict keys must stay the .tdsl names), such names are errors.

No torch here: the attribute list is static, and tests/test_lang_names.py checks it against
``dir(torch.nn.Module())`` and the runtime's base classes so that a new PyTorch cannot slip a name by.
"""
from __future__ import annotations

import builtins
import keyword

# Public attributes of an nn.Module instance (PyTorch 2.x). Names starting with "_" are refused as
# a whole, since PyTorch adds private attributes in every release.
MODULE_ATTRS = frozenset("""T_destination add_module apply bfloat16 buffers call_super_init children
compile cpu cuda double dump_patches eval extra_repr float forward get_buffer get_extra_state
get_parameter get_submodule half ipu load_state_dict modules mtia named_buffers named_children
named_modules named_parameters parameters register_backward_hook register_buffer
register_forward_hook register_forward_pre_hook register_full_backward_hook
register_full_backward_pre_hook register_load_state_dict_post_hook
register_load_state_dict_pre_hook register_module register_parameter register_state_dict_post_hook
register_state_dict_pre_hook requires_grad_ set_extra_state set_submodule share_memory state_dict
to to_empty train training type xpu zero_grad""".split()) | {
    "smart_apply"}  # added to every nn.Module by transformers (5.x) once it builds a model

# What the compiled model's base class (runtime/model.py), the generated class body and the
# checkpoint loader (model.checkpoint_meta) add to a model instance.
COMPILED_ATTRS = frozenset("""check_input input_shape tdsl_source tdsl_model tdsl_fp32
checkpoint_meta vocab_size max_len example_input""".split())

# The globals of a generated module (see codegen.generate): a model class must not replace them.
GENERATED_GLOBALS = frozenset("""torch F nn rt Binary Float Int Ternary TDSL_SOURCE
SOURCE_PATH""".split())

_BUILTINS = frozenset(dir(builtins))


def _reason(name: str, model: bool) -> str | None:
    if keyword.iskeyword(name):
        return "it is a Python keyword"
    if name.startswith("_"):
        return "names starting with '_' are reserved for Python and PyTorch internals"
    if model:
        if name in GENERATED_GLOBALS:
            return "the generated module already uses it"
        if name in _BUILTINS:
            return "it is a Python builtin"
    elif name in MODULE_ATTRS or name in COMPILED_ATTRS:
        return "it is an attribute every nn.Module (or compiled model) already has"
    return None


def layer_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a layer, or None when it can."""
    return _reason(name, model=False)


def model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a model (a class of the generated module), or None."""
    return _reason(name, model=True)


def alternative(name: str, model: bool = False) -> str:
    """A close name that is allowed: 'forward' -> 'forward_', '__x' -> 'x'."""
    alt = name.lstrip("_") or ("Model" if model else "layer")
    while _reason(alt, model):
        alt += "_"
    return alt


class Scope(dict):
    """The names taken in one namespace (name -> line), with the next free number per base so
    that naming N unnamed layers costs O(N), not O(N^2)."""

    def __init__(self):
        super().__init__()
        self.next: dict[str, int] = {}


def unique(base: str, names: dict, line: int) -> str:
    """``base``, or ``base2``, ``base3``... if taken; the name is then taken."""
    name, n = base, 1
    while name in names:
        n += 1
        name = f"{base}{n}"
    names[name] = line
    return name
