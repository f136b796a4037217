"""``utils.py`` alone is the library: copied into an empty directory, it runs the README's "Plug into your code"
snippet in a fresh interpreter that cannot see this repository (no utils_qa, utils_fsdp, scripts or remote_code)."""
import json
import os
import shutil
import subprocess
import sys

from conftest import REPO
from test_readme import _snippet

# Runs after the snippet, in the same interpreter: compacts the trained model and prints what the test checks.
_CHECK = r'''
import importlib.util, json, os, sys
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
    "utils_file": os.path.realpath(utils.__file__),
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


def test_utils_alone_runs_the_readme_snippet(tmp_path):
    shutil.copy(REPO / "utils.py", tmp_path / "utils.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    code = "import torch\ntorch.manual_seed(0)\n" + _snippet() + _CHECK
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert r["utils_file"] == os.path.realpath(tmp_path / "utils.py") and r["importable"] == []
    assert r["layers"] == r["compacted"] == 12  # 2 BERT layers x (q, k, v, attention out, intermediate, output)
    # kept sparse fraction == final_threshold (0.15) within one row per layer
    assert abs(r["sparse_params"] - 0.15 * r["dense_params"]) <= r["row_slack"]
    assert set(r["paths"]) <= {"fused", "transposed", "onehot", "merged"}  # the compacted forms ran
    # compaction frees the dropped rows of S; what the report counts is what the model and its reload hold
    assert r["params_after"] == r["model_params"] == r["params_reloaded"]
    assert r["params_before"] - r["params_after"] >= 0.8 * r["dense_params"] - r["row_slack"]
    assert r["diff_prune"] <= 1e-5 and r["diff_reloaded"] <= 1e-5
    # the remote code lives beside utils.py in the repository: without it the export still loads with load_compact
    assert r["export"] == ["README.md", "config.json", "losparse_config.json", "losparse_model.safetensors"]
    assert "modeling_losparse.py not found (utils.py copied alone?)" in proc.stderr
