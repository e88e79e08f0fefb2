"""What every command shares: exit codes, the argument parser class, diagnostics printing."""
from __future__ import annotations

import argparse
import sys

from ..lang.diagnostics import render_all
from ..lang.frontend import Result

EXIT_OK, EXIT_INPUT, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 itself; keep its message short and plain
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def report(r: Result) -> bool:
    """Print a file's diagnostics to stderr; True when it has no errors."""
    if r.diagnostics:
        print(render_all(r.path, r.text, r.diagnostics), file=sys.stderr)
    return r.ok
