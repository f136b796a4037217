"""``pip install .`` into a fresh virtual environment gives a ``losparse`` package that runs the README's "Plug into
your code" snippet from a directory that cannot see this repository: as ``import losparse`` (the snippet as printed)
and through a copy of the repository's ``utils.py`` facade. The package ships its remote code (package data), so
the export loads with plain transformers too."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO
from test_readme import _snippet

# Runs after the snippet, in the same interpreter: compacts the trained model and prints what the test checks.
_CHECK = r'''
import importlib.util, json, os, sys
import losparse
ids = torch.randint(0, 100, (2, 7))
model.eval()
with torch.no_grad():
    before = model(input_ids=ids).logits
    params_before = sum(p.numel() for p in model.parameters())
    compacted = utils.prune(model)
    after = model(input_ids=ids).logits
    reloaded = small(input_ids=ids).logits
rep = utils.compression_report(model)
print("RESULT " + json.dumps({
    "utils_file": os.path.realpath(utils.__file__), "losparse_file": os.path.realpath(losparse.__file__),
    "importable": [m for m in ("utils_qa", "utils_fsdp", "run_glue", "modeling_losparse")
                   if importlib.util.find_spec(m) is not None],
    "layers": len(rep.layers), "compacted": compacted, "dense_params": rep.dense_params,
    "sparse_params": rep.sparse_params, "row_slack": sum(l["in_features"] for l in rep.layers),
    "paths": sorted({l["path"] for l in rep.layers}),
    "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
    "params_reloaded": sum(p.numel() for p in small.parameters()), "model_params": rep.model_params,
    "diff_prune": (after - before).abs().max().item(), "diff_reloaded": (reloaded - after).abs().max().item(),
    "export": sorted(os.listdir("compact_model")),
}))
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(python, site-packages)`` of a fresh virtual environment into which ``pip install .`` put the package, built
    from a copy of what the package needs (``pyproject.toml``, ``README.md``, ``losparse/``), so nothing else of the
    repository comes along. Offline: the dependencies (torch, transformers, safetensors) are those of the test
    environment, made visible by a ``.pth`` file; pip installs the package alone (``--no-deps --no-index``)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "losparse", src / "losparse", ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "--no-build-isolation", "-q", "--disable-pip-version-check", str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return python, Path(site)


@pytest.mark.parametrize("how", ["losparse", "utils"])
def test_installed_package_runs_the_readme_snippet(installed, tmp_path, how):
    python, site = installed
    snippet = _snippet()
    first = "import losparse as utils  # or, in this repository: import utils\n"
    assert first in snippet
    if how == "utils":  # the repository's facade, copied alone next to the user's code
        shutil.copy(REPO / "utils.py", tmp_path / "utils.py")
        snippet = snippet.replace(first, "import utils\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    code = "import torch\ntorch.manual_seed(0)\n" + snippet + _CHECK
    proc = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    package = os.path.realpath(site / "losparse" / "__init__.py")
    assert r["losparse_file"] == package  # the installed copy, not the repository's
    assert r["utils_file"] == (package if how == "losparse" else os.path.realpath(tmp_path / "utils.py"))
    assert r["importable"] == []  # nothing else of the repository is visible
    assert r["layers"] == r["compacted"] == 12  # 2 BERT layers x (q, k, v, attention out, intermediate, output)
    # kept sparse fraction == final_threshold (0.15) within one row per layer
    assert abs(r["sparse_params"] - 0.15 * r["dense_params"]) <= r["row_slack"]
    assert set(r["paths"]) <= {"fused", "transposed", "onehot", "merged"}  # the compacted forms ran
    # compaction frees the dropped rows of S; what the report counts is what the model and its reload hold
    assert r["params_after"] == r["model_params"] == r["params_reloaded"]
    assert r["params_before"] - r["params_after"] >= 0.8 * r["dense_params"] - r["row_slack"]
    assert r["diff_prune"] <= 1e-5 and r["diff_reloaded"] <= 1e-5
    # the remote code is package data: the export loads without this repository
    assert r["export"] == ["README.md", "config.json", "losparse_config.json", "losparse_model.safetensors",
                           "modeling_losparse.py"]
    assert (site / "losparse" / "remote_code" / "modeling_losparse.py").read_bytes() == \
        (REPO / "losparse" / "remote_code" / "modeling_losparse.py").read_bytes()
