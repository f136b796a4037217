"""``benchmarks/run_gpu.sh --quick``: every section of the one GPU command runs on CPU, without datasets,
evaluate, nltk or rouge-score importable, and leaves every figure in figures.jsonl and a table in figures.md;
a failing section is recorded and the others still run; past the budget sections are skipped."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("datasets", "evaluate", "nltk", "rouge_score")


def _records(out):
    return [json.loads(line) for line in (out / "figures.jsonl").read_text().splitlines()]


def _lines(recs, section, what):
    return [r for r in recs if r["section"] == section and r["what"] == what]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_gpu")
    site = tmp / "site"
    site.mkdir()
    # Imported at interpreter start: any import of these modules fails, as on a GPU machine without them.
    (site / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED))
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(site), CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = tmp / "out"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "run_gpu.sh"), str(out), "--quick"], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_quick_run_covers_every_section(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(out)
    stdout = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert stdout == recs  # every figure printed as it was written
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run_gpu

    assert [r["section"] for r in recs if r["what"] == "section"] == list(run_gpu.SECTIONS)
    assert all(r["status"] == "ok" for r in recs if r["what"] == "section")
    assert not [r for r in recs if r["what"] in ("error", "skipped")]
    assert recs[-1]["what"] == "done"

    stacks = {(r["what"], r["variant"], r["ratio"]) for r in _lines(recs, "stacks", "stack72")
              + _lines(recs, "stacks", "stack_llama")}
    assert stacks == {(w, v, r) for w in ("stack72", "stack_llama") for v, r in
                      (("dense", None), ("compact", 0.1), ("compact", 0.2))}
    for section in ("bert", "deberta"):
        inf = _lines(recs, section, "inference")
        assert {(r["variant"], r["compiled"]) for r in inf} == {(v, m) for v in ("dense", "compact")
                                                                for m in (False, "reduce-overhead")}
        assert all(r["dtype"] == "bf16" and r["shape"] == [2, 16] for r in inf)
        assert {r["speedup_vs_dense"] for r in inf if r["variant"] == "dense"} == {1.0}
        compiled = [r for r in inf if r["variant"] == "compact" and r["compiled"]]
        assert sum(compiled[0]["paths"].values()) == 6  # the prepared layers report their one form
        assert _lines(recs, section, "ops")
    assert {(r["variant"], r["dtype"]) for r in _lines(recs, "train", "train_step")} == {
        (v, d) for v in ("dense", "losparse") for d in ("fp32", "bf16")}
    assert [r["phase"] for r in _lines(recs, "pruner", "pruner") if r["phase"] == "average_step"] == ["average_step"]
    assert {r["method"] for r in _lines(recs, "svd", "svd")} == {"full", "auto"}
    assert {r["variant"] for r in _lines(recs, "generate", "generate")} == {"dense", "compact_0.2"}
    assert {(r["variant"], r["compiled"]) for r in _lines(recs, "stack72_compiled", "stack72")} == {
        (v, m) for v in ("dense", "compact") for m in (False, "reduce-overhead")}

    md = (out / "figures.md").read_text()
    assert md.startswith("# GPU figures (") and "QUICK" in md.splitlines()[0]
    figures, targets = md.split("| target | measured | |")
    measured = [line for line in figures.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    assert len(measured) == len([r for r in recs if r["what"] in ("inference", "stack72", "stack_llama", "train_step",
                                                                     "svd", "generate")]) + 1  # + pruner average
    targets = [line for line in targets.splitlines() if line.startswith("| ")]
    assert len(targets) == 12 and all(t.endswith(("| met |", "| not met |", "| not measured |")) for t in targets)


def test_failed_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run_gpu

    def boom(argv):
        print(json.dumps({"what": "partial", "x": 1}))
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setitem(run_gpu.SECTIONS, "generate", (types.SimpleNamespace(main=boom), [], []))
    def svd(argv):
        torch.backends.cuda.matmul.allow_tf32 = True  # as bench_train does: must not leak into later sections
        print(json.dumps({"what": "svd", "method": "auto", "matrices": 72, "seconds": 0.25}))

    monkeypatch.setitem(run_gpu.SECTIONS, "svd", (types.SimpleNamespace(main=svd), [], []))
    import torch

    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert run_gpu.main([str(tmp_path), "--quick", "--sections", "generate,svd"]) == 1
    assert torch.backends.cuda.matmul.allow_tf32 is False
    recs = _records(tmp_path)
    assert [(r["section"], r["what"]) for r in recs] == [("generate", "partial"), ("generate", "error"),
                                                         ("svd", "svd"), ("svd", "section"), ("all", "done")]
    assert "out of memory" in recs[1]["error"] and "RuntimeError" in recs[1]["traceback"]
    md = (tmp_path / "figures.md").read_text()
    assert "| generate | ERROR |" in md and "| SVD substitution (auto, 72 matrices) ≤ 0.5 s | 0.25 | met |" in md


def test_budget_skips_sections_and_bad_sections_are_refused(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run_gpu

    assert run_gpu.main([str(tmp_path), "--quick", "--sections", "svd,generate", "--budget-s", "-1"]) == 0
    assert [(r["section"], r["what"]) for r in _records(tmp_path)] == [("svd", "skipped"), ("generate", "skipped"),
                                                                       ("all", "done")]
    with pytest.raises(SystemExit):
        run_gpu.main([str(tmp_path), "--sections", "bert,gpu"])
    assert "--sections: unknown ['gpu']; allowed: stacks, bert" in capsys.readouterr().err


def test_every_full_section_parses_its_arguments():
    """The GPU argv of each section is valid for its script (parsed here with --device cpu)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run_gpu

    for name, (module, full, quick) in run_gpu.SECTIONS.items():
        args = module.parse_args(full + ["--device", "cpu"])
        assert not args.quick, name
        if module.__name__ == "bench_inference":
            assert args.dtypes == ["bf16"] and args.skip_original and args.compile_backend == "inductor"
    bert = run_gpu.SECTIONS["bert"][0].parse_args(run_gpu.SECTIONS["bert"][1])
    assert (bert.models, bert.batch_sizes, bert.seq_len, bert.ratios) == (["bert"], [32], 128, [0.2])
    assert bert.compile_modes == ["none", "default", "reduce-overhead"]
    stacks = run_gpu.SECTIONS["stacks"][0].parse_args(run_gpu.SECTIONS["stacks"][1] + ["--device", "cpu"])
    assert (stacks.stack_tokens, stacks.llama_tokens, stacks.ratios, stacks.skip_llama) == (16384, 16384, [0.1, 0.2],
                                                                                          False)


def test_an_interrupted_run_keeps_its_table(tmp_path, monkeypatch):
    """run_gpu.sh's timeout sends SIGINT: the figures so far stay, with an ``interrupted`` line and the table."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import run_gpu

    def slow(argv):
        print(json.dumps({"what": "svd", "method": "auto", "matrices": 72, "seconds": 0.75}))
        raise KeyboardInterrupt

    monkeypatch.setitem(run_gpu.SECTIONS, "svd", (types.SimpleNamespace(main=slow), [], []))
    assert run_gpu.main([str(tmp_path), "--quick", "--sections", "svd,generate"]) == 130
    assert [(r["section"], r["what"]) for r in _records(tmp_path)] == [("svd", "svd"), ("all", "interrupted")]
    assert "| SVD substitution (auto, 72 matrices) ≤ 0.5 s | 0.75 | not met |" in (tmp_path / "figures.md").read_text()
