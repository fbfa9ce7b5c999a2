"""Packaging: the engine imports without ComfyUI, the ComfyUI entry registers nothing outside
ComfyUI, and pyproject.toml carries what PyPI, ComfyUI-Manager and the Comfy Registry read."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_engine_never_imports_comfyui():
    out = run_python(
        "import pkgutil, importlib, sys, nunchaku_ext\n"
        "for m in pkgutil.walk_packages(nunchaku_ext.__path__, 'nunchaku_ext.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(k for k in sys.modules if k == 'comfy' or k.startswith('comfy.')))")
    assert out.strip() == "[]"


def test_root_package_registers_nothing_outside_comfyui():
    out = run_python(
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('svdquant_pack', '__init__.py',\n"
        "                                              submodule_search_locations=['.'])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['svdquant_pack'] = module\n"
        "spec.loader.exec_module(module)\n"
        "print(module.NODE_CLASS_MAPPINGS, 'comfy' in sys.modules)")
    assert out.strip() == "{} False"


def test_pyproject_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    p = project["project"]
    assert p["name"] == "comfyui-svdquant"
    assert re.fullmatch(r"\d+\.\d+\.\d+", p["version"])
    assert p["requires-python"].startswith(">=")
    bounds = {re.split(r"[<>=!~ ]", d)[0]: d for d in p["dependencies"]}
    for dep in ("torch", "safetensors", "numpy", "ninja", "comfyui-frontend-package"):
        assert ">=" in bounds[dep], f"{dep} needs a lower bound"
    assert any(d.startswith("pytest") for d in p["optional-dependencies"]["test"])
    assert p["urls"]["Repository"].startswith("https://")
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    # ComfyUI-Manager installs requirements.txt into ComfyUI's environment: never torch.
    reqs = [r.split(">=")[0].strip() for r in (ROOT / "requirements.txt").read_text().splitlines()
            if r.strip() and not r.startswith("#")]
    assert "torch" not in reqs and {"safetensors", "numpy", "ninja"} <= set(reqs)
