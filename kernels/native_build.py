"""Building the native CPU kernel (cpu_linear.c) once per machine, safely.

The library is built for this CPU (-march=native) into $TRITON_DSL_CACHE (default
~/.cache/triton-dsl), named by a hash of the source, the flags, the compiler and the CPU, so a
changed file or another machine gets its own build. Many processes may start it at once (DDP
ranks, test workers): they take a file lock, one compiles, the others wait and load its result;
the write is atomic. A failed build (no compiler, no OpenMP as on stock macOS clang, a compiler
error, or no answer within TRITON_DSL_CC_TIMEOUT seconds, default 120) leaves a marker named by
the same hash, so later processes use the fallback without compiling again. A changed compiler,
CC or flags changes the hash and retries; so does deleting the cache folder or setting
TRITON_DSL_CPU_RETRY=1.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from ..files import write_atomic
from .common import cpu_info

try:  # POSIX; elsewhere concurrent builds still cannot load a half-written file (os.replace)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

# compiled together into one library; cpu_linear.c declares the ABI version
SOURCES = tuple(Path(__file__).with_name(n)
                for n in ("cpu_linear.c", "cpu_amx.c", "cpu_decode.c", "cpu_qconv.c",
                          "cpu_conv_amx.c"))
HEADERS = (Path(__file__).with_name("cpu_common.h"),)  # included by them: hashed with them
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c11"]


class BuildError(RuntimeError):
    """The library cannot be built here; cached is True when a marker from an earlier attempt
    said so (nothing was compiled this time)."""

    def __init__(self, reason: str, cached: bool = False):
        super().__init__(reason)
        self.cached = cached


def _timeout() -> float:
    try:
        return float(os.environ.get("TRITON_DSL_CC_TIMEOUT") or 120)
    except ValueError:  # a typo must not turn into a traceback on the first forward pass
        return 120.0


def cache_dir() -> Path:
    """Where the library and the tuning choices are kept: $TRITON_DSL_CACHE, or
    ~/.cache/triton-dsl."""
    return Path(os.environ.get("TRITON_DSL_CACHE") or Path.home() / ".cache" / "triton-dsl")


def cpu_id() -> str:
    """The lines of /proc/cpuinfo that decide what code runs best here: model and flags."""
    keep = [line for line in cpu_info().splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def compiler() -> str | None:
    """$CC when set (and only it: a CC that is missing is an error, not a reason to use
    another), else the first of cc, gcc, clang on PATH."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _run(cmd: list, timeout: float) -> subprocess.CompletedProcess:
    """cmd with a time limit; on timeout its whole process group is killed (a compiler driver
    leaves children) and BuildError says so."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise BuildError(f"{Path(cmd[0]).name} did not finish within {timeout:g} s "
                         f"(TRITON_DSL_CC_TIMEOUT)") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def build(extra_flags: tuple = ()) -> Path:
    """Compile (or find in the cache) the library; raises BuildError saying why it cannot."""
    flags = FLAGS + list(extra_flags)
    cc = compiler()
    version = ""
    if cc is not None:
        try:
            version = _run([cc, "--version"], min(_timeout(), 30)).stdout
        except (BuildError, OSError):
            version = "no answer to --version"  # the compile below says what is wrong
    texts = [s.read_text() for s in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, " ".join(flags), cc or "", version,
                                    cpu_id()]).encode()).hexdigest()[:16]
    cache = cache_dir()
    lib, failed = cache / f"cpu_linear-{key}.so", cache / f"cpu_linear-{key}.failed"
    retry = os.environ.get("TRITON_DSL_CPU_RETRY") == "1"
    if lib.exists():
        return lib
    if failed.exists() and not retry:
        raise _cached_failure(failed)
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f"cpu_linear-{key}.lock"):
        if lib.exists():  # another process built it while this one waited
            return lib
        if failed.exists() and not retry:
            raise _cached_failure(failed)
        try:
            _compile(cc, flags, lib)
        except BuildError as e:
            write_atomic(str(failed), str(e) + "\n")
            raise
        with contextlib.suppress(FileNotFoundError):
            failed.unlink()
    return lib


def _cached_failure(marker: Path) -> BuildError:
    return BuildError(f"{marker.read_text().strip()}; an earlier build failed, "
                      f"TRITON_DSL_CPU_RETRY=1 retries", cached=True)


def _compile(cc: str | None, flags: list, lib: Path):
    if cc is None:
        want = os.environ.get("CC")
        raise BuildError(f"CC={want} not found" if want else "no C compiler found (set CC)")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        try:
            run = _run([cc, *flags, *map(str, SOURCES), "-o", tmp, "-lm"], _timeout())
        except OSError as e:
            raise BuildError(f"{cc} could not run: {e}") from None
        if run.returncode != 0:  # the first line that says error (gcc ends with "compilation
            lines = run.stderr.strip().splitlines()  # terminated."), else the last one
            why = next((line for line in lines if "error" in line.lower()),
                       lines[-1] if lines else f"exit status {run.returncode}")
            raise BuildError(f"{Path(cc).name} failed: {why.strip()[-300:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
