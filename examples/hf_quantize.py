"""A Hugging Face model quantized by a rules file, frozen into packed weights, and run:

    python examples/hf_quantize.py [--rules examples/hf_llama_rules.tdsl]

Builds the small random-weight Llama of examples/hf_models.py (no download), prints the plan,
quantizes it in place (fine-tuning would run here, in your own loop), freezes it, compares its
logits with the float model's and greedily generates a few tokens with both.
"""
import argparse
import copy
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import triton_dsl  # noqa: E402
from triton_dsl import runtime as rt  # noqa: E402
from hf_models import tiny_llama  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules", default=os.path.join(HERE, "hf_llama_rules.tdsl"))
    ap.add_argument("--tokens", type=int, default=8, help="tokens to generate")
    args = ap.parse_args(argv)
    float_model = tiny_llama()
    model = copy.deepcopy(float_model)
    try:
        plan = triton_dsl.quantize(model, args.rules)
    except triton_dsl.TdslError as e:
        print(e, file=sys.stderr)
        return 1
    print(plan.render())
    rt.freeze(model)
    prompt = torch.tensor([[1, 17, 42, 99, 7]])
    with torch.no_grad():
        ref, got = float_model(prompt).logits, model(prompt).logits
        print(f"\nlogits: max |frozen - float| = {(got - ref).abs().max():.4f} "
              f"(float logits span {ref.min():.3f}..{ref.max():.3f})")
        for name, m in (("float", float_model), ("frozen", model)):
            out = m.generate(prompt, max_new_tokens=args.tokens, do_sample=False)
            print(f"{name:>6} generates: {out[0, prompt.shape[1]:].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
