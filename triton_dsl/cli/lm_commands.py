"""`triton-dsl generate`: text from a language-model checkpoint (imports torch only to run)."""
from __future__ import annotations

import sys

from ..lang.precision import FLOAT_BITS
from .common import EXIT_OK
from .workflow_commands import _number, _positive_int, _workflow_errors


@_workflow_errors
def cmd_generate(args) -> int:
    from ..workflow.textgen import generate
    text = generate(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                    args.top_k, args.seed, args.kv_cache)
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"  # a C locale's ascii, say
    sys.stdout.write(text.encode(enc, errors="replace").decode(enc) + "\n")
    return EXIT_OK


def add_commands(sub):
    s = sub.add_parser("generate", help="continue a prompt with a language-model checkpoint",
                       description="Print the continuation of --prompt, decoded byte by byte "
                       "with a KV cache; the same --seed gives the same text.")
    s.add_argument("checkpoint")
    s.add_argument("--prompt", default="", help="the text to continue (default: empty)")
    s.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N",
                   help="bytes to generate (past max_len the context slides)")
    s.add_argument("--temperature", type=_number(0, False), default=0.8, metavar="T",
                   help="0: always the most likely byte")
    s.add_argument("--top-k", type=_positive_int, metavar="K",
                   help="sample among the K most likely bytes only")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--kv-cache", choices=tuple(FLOAT_BITS), default="fp32",
                   help="the cached keys' and values' type: bf16 halves what a step reads at a "
                   "long context (default: fp32)")
    s.set_defaults(func=cmd_generate)
