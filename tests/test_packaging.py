"""The wheel carries the grammar and kernels inside triton_dsl, never as top-level packages."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_contents_and_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), ROOT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    with zipfile.ZipFile(tmp_path / wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert "triton_dsl/grammar/tdsl.lark" in names
    assert "triton_dsl/kernels/cpu_linear.c" in names  # the native CPU kernel builds from it
    assert "triton_dsl/kernels/cpu_common.h" in names  # and includes this
    assert "triton_dsl/kernels/__init__.py" in names
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and "grammar" not in tops
    assert any(n.endswith("entry_points.txt") for n in names)
    # the CLI runs from the unpacked wheel alone (not from this checkout)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-m", "triton_dsl", "check",
                        os.path.join(ROOT, "examples", "mnist_ternary.tdsl")],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", "import triton_dsl, sys; print(triton_dsl.__file__)"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.stdout.startswith(str(tmp_path / "site"))


def test_editable_install_maps_into_this_checkout():
    """scripts/setup.sh installs with `pip install -e`: the installed package's grammar and
    kernels are this checkout's grammar/ and kernels/ folders (package-dir mapping), so an edit
    here is what runs."""
    import json
    from importlib import metadata, resources
    urls = [json.loads(d.read_text("direct_url.json") or "{}")  # (skips the checkout's egg-info)
            for d in metadata.distributions(name="triton-dsl")]
    if not any(u.get("dir_info", {}).get("editable") for u in urls):
        pytest.skip("triton-dsl is not installed in editable mode here")
    for pkg, folder in (("triton_dsl.grammar", "grammar"), ("triton_dsl.kernels", "kernels")):
        where = os.path.realpath(str(resources.files(pkg)))
        assert where == os.path.realpath(os.path.join(ROOT, folder)), (pkg, where)
    assert "model" in resources.files("triton_dsl.grammar").joinpath("tdsl.lark").read_text()
