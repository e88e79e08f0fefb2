"""Building the native CPU kernel as a product: one build for concurrent first uses (file
lock), a failed build said once and not retried (failure marker), a compiler that hangs is
stopped (timeout), and one declaration of the C ABI, checked against the C source and at load.

Each test builds into its own TRITON_DSL_CACHE under tmp_path, through a CC wrapper script that
logs every call, so it neither reads nor disturbs the shared cache.
"""
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from triton_dsl.kernels import native

REAL_CC = native.compiler()
needs_cc = pytest.mark.skipif(REAL_CC is None, reason="no C compiler on this machine")

PROBE = """
import torch
from triton_dsl.kernels import native
from triton_dsl.kernels.ops import ternary_matmul
from triton_dsl.kernels.packing import pack_ternary
p = pack_ternary(torch.randint(-1, 2, (8, 40), dtype=torch.int8))
x, s = torch.randn(3, 40), torch.rand(8)
y = ternary_matmul(x, p, s, activations="dynamic", backend="cpu")
r = ternary_matmul(x, p, s, activations="dynamic", backend="ref")
print(native.describe(), torch.equal(y, r))
"""
LINE = "triton-dsl: native CPU kernel unavailable ("


def _cc(tmp_path, body: str) -> str:
    """A CC script that appends its arguments to tmp_path/cc.log, then runs body."""
    path = tmp_path / "cc"
    path.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/cc.log"\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _compiles(tmp_path) -> int:
    """How many times the CC script was asked to compile (not for --version)."""
    log = tmp_path / "cc.log"
    return sum(" -o " in line for line in log.read_text().splitlines()) if log.exists() else 0


def _start(tmp_path, cc: str, **env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_DSL_CPU_FLAGS", "TRITON_DSL_CPU_NATIVE")}
    env.update(TRITON_DSL_CACHE=str(tmp_path / "cache"), CC=cc, **env_extra)
    return subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the process did not finish within {timeout} s")
    assert proc.returncode == 0, err[-2000:]
    return out.strip(), [line for line in err.splitlines() if line.startswith(LINE)]


@needs_cc
def test_concurrent_first_uses_build_once(tmp_path):
    cc = _cc(tmp_path, f'exec "{REAL_CC}" "$@"')
    procs = [_start(tmp_path, cc) for _ in range(2)]
    results = [_finish(p) for p in procs]
    for out, lines in results:
        assert out.startswith("native (") and out.endswith("True") and not lines
    assert _compiles(tmp_path) == 1
    assert len(list((tmp_path / "cache").glob("*.so"))) == 1


def test_failed_build_says_why_once_and_is_not_retried(tmp_path):
    cc = _cc(tmp_path, textwrap.dedent("""\
        if [ "$1" = "--version" ]; then echo "fake cc 1.0"; exit 0; fi
        echo "cpu_linear.c:1: fatal error: omp.h: No such file or directory" >&2
        exit 1"""))
    out, lines = _finish(_start(tmp_path, cc))
    assert out.startswith("unavailable: cc failed: ") and out.endswith("True")  # fallback works
    assert len(lines) == 1 and "omp.h: No such file" in lines[0]
    assert "using torch's int8 GEMMs" in lines[0] and "slower" in lines[0]
    out, lines = _finish(_start(tmp_path, cc))  # a second process: silent, no compile
    assert out.endswith("True") and "TRITON_DSL_CPU_RETRY=1" in out and not lines
    assert _compiles(tmp_path) == 1
    out, lines = _finish(_start(tmp_path, cc, TRITON_DSL_CPU_RETRY="1"))  # asked to retry
    assert len(lines) == 1 and _compiles(tmp_path) == 2


def test_missing_compiler_says_so_once(tmp_path, monkeypatch, capsys):
    """In-process, as a second process would see it: library() prints the line when its own
    build fails, not when it finds the marker."""
    missing = str(tmp_path / "no-such-cc")
    monkeypatch.setenv("TRITON_DSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", missing)
    monkeypatch.delenv("TRITON_DSL_CPU_NATIVE", raising=False)
    monkeypatch.delenv("TRITON_DSL_CPU_FLAGS", raising=False)
    try:
        for said in (1, 0):
            native.library.cache_clear()
            assert native.library() is None
            assert native.describe().startswith(f"unavailable: CC={missing} not found")
            assert capsys.readouterr().err.count(LINE) == said
    finally:
        monkeypatch.undo()
        native.library.cache_clear()  # the next caller loads the real library again


def test_compiler_timeout_does_not_hang(tmp_path):
    cc = _cc(tmp_path, textwrap.dedent("""\
        if [ "$1" = "--version" ]; then echo "slow cc 1.0"; exit 0; fi
        sleep 60"""))
    out, lines = _finish(_start(tmp_path, cc, TRITON_DSL_CC_TIMEOUT="1"), timeout=40)
    assert out.endswith("True") and len(lines) == 1
    assert "did not finish within 1 s" in lines[0]


def test_abi_table_matches_the_c_prototypes():
    """native.SIGNATURES is the one declaration of the exported functions: the C prototypes
    must say the same, in the same order, and the C ABI number must be native.ABI."""
    src = "\n".join(s.read_text() for s in native.SOURCES)
    ctypes_of = {"int": native._I32, "int64_t": native._I64, "float": native._F32, "void": None}
    found = {}
    for ret, name, args in re.findall(r"^(int) (tdsl_\w+)\(([^)]*)\)", src, re.M):
        types = []
        for arg in " ".join(args.split()).split(","):
            arg = arg.strip()
            if arg == "void":
                continue
            types.append(native._P if "*" in arg else ctypes_of[arg.rsplit(" ", 1)[0]
                                                                .replace("const ", "")])
        found[name] = (ctypes_of[ret], types)
    assert found == native.SIGNATURES
    assert int(re.search(r"#define TDSL_ABI (\d+)", src).group(1)) == native.ABI


@needs_cc
@pytest.mark.parametrize("body", ["int tdsl_abi(void) { return 1; }",
                                  "int other(void) { return 0; }"])
def test_a_library_of_another_abi_is_refused(tmp_path, body):
    src = tmp_path / "stale.c"
    src.write_text(body + "\n")
    lib = tmp_path / "stale.so"
    subprocess.run([REAL_CC, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True,
                   timeout=60)
    with pytest.raises(RuntimeError, match=rf"C ABI (1|None), this triton-dsl needs "
                                           rf"{native.ABI}"):
        native.Library(lib)


def test_build_reports_a_cached_failure_without_compiling(tmp_path, monkeypatch):
    """In-process: build() raises BuildError(cached=True) once the marker exists."""
    monkeypatch.setenv("TRITON_DSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    with pytest.raises(native.BuildError) as first:
        native.build()
    assert not first.value.cached
    with pytest.raises(native.BuildError) as second:
        native.build()
    assert second.value.cached and "not found" in str(second.value)
    assert shutil.which(str(tmp_path / "missing-cc")) is None
