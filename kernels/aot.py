"""Compile the kernels ahead of time for a GPU target, without a GPU.

Triton lowers a kernel to PTX and a cubin (with the ptxas it ships) for any CUDA target, so a
machine with no GPU can still prove that every kernel variant and autotune config is legal for,
say, an H100 (sm_90): dot operand types and shapes, layouts, shared-memory budgets. It cannot
prove the results are right: that needs the GPU tests.
"""
from __future__ import annotations

from .common import HAS_TRITON, configs, triton

_POINTERS = {
    "ternary": {"p_ptr": "*u8"},
    "int8": {"w_ptr": "*i8"},
}


def variants():
    """(kernel name, x dtype, flags) for every form the launchers can ask for."""
    for dt, a8 in (("fp16", False), ("bf16", False), ("fp32", False), ("i8", True)):
        for per_channel in (True, False):
            yield "ternary", dt, dict(A8=a8, PER_CHANNEL=per_channel, HAS_BIAS=True,
                                      IEEE=dt == "fp32")
        for group in ((0, 128) if not a8 else (0,)):
            yield "int8", dt, dict(A8=a8, GROUP=group, HAS_BIAS=True, IEEE=dt == "fp32")


def compile_variant(kernel: str, x_dtype: str, flags: dict, config, arch: int = 90):
    """Compile one kernel variant with one triton.Config for cuda:sm_<arch>; returns the
    compiled kernel (its .asm has ptx and cubin) or raises."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kernel == "ternary":
        from .ternary_matmul import _ternary_kernel as fn
    else:
        from .int8_matmul import _int8_kernel as fn
    const = dict(flags, **config.kwargs)
    if kernel == "int8" and flags["GROUP"] and flags["GROUP"] % const["BLOCK_K"]:
        return None  # the launcher never pairs these (BLOCK_K must divide the group)
    ptrs = {"x_ptr": "*" + x_dtype, "s_ptr": "*fp32", "xs_ptr": "*fp32", "b_ptr": "*fp32",
            "y_ptr": "*fp32", **_POINTERS[kernel]}
    sig = {n: ptrs.get(n, "constexpr" if n in const else "i32") for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config.num_warps,
                                       num_stages=config.num_stages))


def all_configs(int8: bool, x_dtype: str = "fp16"):
    """The GPU autotune table (configs() returns one small config under the interpreter)."""
    import os
    saved = os.environ.pop("TRITON_INTERPRET", None)
    configs.cache_clear()
    try:
        return configs(int8, x_dtype == "fp32")
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
        configs.cache_clear()


SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes of shared memory a block may use


def _area(c):
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] * c.num_stages


PICKS = {
    "all": lambda table: table,
    # the largest tiles: likeliest to break a layout or the shared-memory budget
    "largest": lambda table: [max(table, key=_area)],
    "extremes": lambda table: [max(table, key=_area), min(table, key=_area)],
}


def representative():
    """One variant per kernel and kind of arithmetic (int8 or float activations, grouped
    scales or not): each distinct code path of the kernels, at a fraction of the compile time
    (about 8 s of CPU per variant)."""
    seen = set()
    for kernel, dt, flags in variants():
        key = (kernel, flags["A8"], bool(flags.get("GROUP")))
        if key not in seen:
            seen.add(key)
            yield kernel, dt, flags


def check_all(arch: int = 90, log=print, pick: str = "all", some: bool = False
              ) -> tuple[int, int]:
    """Compile every variant (some: representative() ones) with the autotune configs ``pick``
    takes from its table (all, largest, or extremes: largest and smallest); returns (compiled,
    over the shared-memory limit). Failing compiles raise. Run it without TRITON_INTERPRET:
    interpreted kernels do not compile."""
    if not HAS_TRITON:
        raise RuntimeError("needs triton")
    n = over = 0
    for kernel, dt, flags in representative() if some else variants():
        table = all_configs(flags["A8"], dt)
        for cfg in PICKS[pick](table):
            k = compile_variant(kernel, dt, flags, cfg, arch)
            if k is None:
                continue
            smem = k.metadata.shared
            fits = smem <= SMEM_LIMIT.get(arch, 48 * 1024)
            n, over = n + 1, over + (not fits)
            log(f"{'ok  ' if fits else 'OVER'} {kernel:<8}{dt:<5}{flags}  {cfg.kwargs} "
                f"warps={cfg.num_warps} stages={cfg.num_stages}  smem={smem}")
    return n, over


if __name__ == "__main__":
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="python -m triton_dsl.kernels.aot")
    ap.add_argument("arch", type=int, nargs="?", default=90, help="CUDA arch (90: H100/H200)")
    ap.add_argument("--pick", choices=sorted(PICKS), default="all",
                    help="which autotune configs of each variant to compile")
    ap.add_argument("--some", action="store_true",
                    help="only one variant per kernel and kind of arithmetic")
    a = ap.parse_args()
    n, over = check_all(a.arch, pick=a.pick, some=a.some)
    print(f"compiled {n} kernel variants; {over} over the shared-memory limit")
    sys.exit(1 if over else 0)
