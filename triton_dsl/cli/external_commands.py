"""Commands for models that already exist: `triton-dsl plan RULES --model PKG.MODULE:FACTORY`.

torch and the user's module are imported only when the command runs.
"""
from __future__ import annotations

import sys

from .common import EXIT_INPUT, EXIT_OK


def cmd_plan(args) -> int:
    from ..lang.diagnostics import TdslError
    from ..lang.external import check_rules, read_rules
    from ..workflow.factory import FactoryError, build_model
    rules = check_rules(read_rules(args.rules))  # a bad file fails before any import
    if not rules.ok:
        print(str(TdslError(rules.path, rules.text, rules.diagnostics)), file=sys.stderr)
        return EXIT_INPUT
    try:
        model = build_model(args.model)
        from ..runtime.external import plan
        p = plan(model, rules)
    except TdslError as e:
        print(str(e), file=sys.stderr)
        return EXIT_INPUT
    except FactoryError as e:
        print(f"triton-dsl: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    print(p.to_json() if args.json else p.render())
    return EXIT_OK


def add_commands(sub):
    s = sub.add_parser("plan", help="what a precision section does to an existing model",
                       description="Apply a rules file (a .tdsl file holding only precision "
                       "sections) to the model a factory builds, and print each Linear, "
                       "Conv2d and Conv1D module's precision, bits and packed bytes.")
    s.add_argument("rules", metavar="RULES.tdsl")
    s.add_argument("--model", required=True, metavar="PKG.MODULE:FACTORY",
                   help="a callable that returns the nn.Module, imported with the current "
                   "directory on the path (for example examples.hf_models:tiny_llama)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_plan)
