"""Every GPU figure the README names, in one run (about 8 minutes on one H100/H200).

Runs the benchmark scripts of this folder in-process (their ``main(argv)``), section by section, in this order:

- ``stacks``: the 72-linear stack (DeBERTa-v3-base's matrices) and 2 LLaMA-7B-size blocks at 16k tokens, bf16,
  compacted at 10 % and 20 % against dense (eager);
- ``bert``: BERT-base b32 x 128 bf16, compacted at 20 % against dense, eager, ``torch.compile`` and
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs; compacted copies go through
  ``utils.prepare_for_inference``), with the aten-op counts;
- ``train``: one BERT-base b32 x 128 training step (AdamW), tf32 and bf16 autocast, LoSparse against dense;
- ``pruner``: the pruner's average overhead on a DeBERTa-v3-base step (bf16 autocast, deltaT 10);
- ``svd``: STEP 1 substitution of the 72 matrices (full / randomized / auto) and one 11008 x 4096 matrix;
- ``generate``: greedy decoding tokens/s of a 4-layer LLaMA-7B-size model, dense against compacted 10 %, 20 %;
- ``deberta``: DeBERTa-v3-base b32 x 128 bf16 like ``bert``;
- ``stack72_compiled``: the 72-linear stack under ``reduce-overhead`` (CUDA graphs) against dense.
- ``scale``: one Llama-3-8B-shape decoder block, bf16, compacted at 90 / 80 / 70 / 50 % kept: its seven projections
  on one token, decode on a KV cache of 512 and 2,048 tokens, prefill of 2,048, against the dense block;
- ``scale_one_shot``: the one-shot pipeline (``run_clm.py --init calibrated --one_shot``'s library calls) on two
  Llama-3-8B-shape blocks, 16 x 2048 calibration tokens, stage by stage with the peak GPU memory of each, and its
  projection to Llama-3.2-1B / LLaMA-2-7B / Llama-3-8B / Llama-3-70B.

Each measurement is printed as it comes and appended at once to ``OUT_DIR/figures.jsonl`` (one JSON object per
line, with its ``section``), and ``OUT_DIR/figures.md`` (a short table and the README's GPU targets) is rewritten
after every section, so a run cut short keeps every finished figure. A section that fails writes an ``error``
line and the run goes on; past ``--budget-s`` the remaining sections are skipped (a ``skipped`` line each).
Needs only torch, transformers and accelerate. ``--quick`` runs the same code paths on CPU with tiny shapes
(compile with the ``eager`` backend, which traces but does not generate code) in under a minute: the test suite
runs it (``tests/test_run_gpu.py``).

    bash benchmarks/run_gpu.sh gpu_figures                   # CUDA, about 8 minutes
    python benchmarks/run_gpu.py gpu_figures --sections bert,stacks
    python benchmarks/run_gpu.py /tmp/quick --quick          # CPU smoke run
"""
import argparse
import contextlib
import gc
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (sets the offline environment, puts the repository root on sys.path)

import torch  # noqa: E402

import bench_generate  # noqa: E402
import bench_inference  # noqa: E402
import bench_pruner  # noqa: E402
import bench_scale  # noqa: E402
import bench_svd  # noqa: E402
import bench_train  # noqa: E402

_INFER_MODELS = ["--batch-sizes", "32", "--ratios", "0.2", "--dtypes", "bf16", "--skip-stack", "--skip-llama",
                 "--no-export", "--skip-original", "--compile-modes", "none,default,reduce-overhead"]
_INFER_MODELS_QUICK = ["--quick", "--layers", "1", "--vocab-size", "1000", "--batch-sizes", "2", "--seq-len", "16",
                       "--ratios", "0.2", "--dtypes", "bf16", "--skip-stack", "--skip-llama", "--no-export",
                       "--skip-original", "--compile-modes", "none,reduce-overhead", "--compile-backend", "eager",
                       "--warmup", "1", "--reps", "1"]
_QUICK_STACKS = ["--quick", "--layers", "1", "--stack-tokens", "64", "--llama-tokens", "32", "--llama-blocks", "1",
                 "--llama-hidden", "64", "--llama-ffn", "160", "--warmup", "0", "--reps", "1"]

# section -> (benchmark module, argv on CUDA, argv with --quick on CPU)
SECTIONS = {
    "stacks": (bench_inference, ["--skip-models", "--dtypes", "bf16", "--ratios", "0.1,0.2", "--stack-tokens",
                                 "16384", "--llama-tokens", "16384", "--skip-original"],
               _QUICK_STACKS + ["--skip-models", "--dtypes", "bf16", "--ratios", "0.1,0.2", "--skip-original"]),
    "bert": (bench_inference, ["--models", "bert"] + _INFER_MODELS, ["--models", "bert"] + _INFER_MODELS_QUICK),
    "train": (bench_train, ["--models", "bert", "--dtypes", "fp32,bf16", "--variants", "dense,losparse",
                            "--batch-size", "32", "--seq-len", "128"],
              ["--quick", "--models", "bert", "--layers", "1", "--vocab-size", "1000", "--batch-size", "2",
               "--seq-len", "16", "--dtypes", "fp32,bf16", "--variants", "dense,losparse", "--warmup", "0",
               "--reps", "1"]),
    "pruner": (bench_pruner, ["--dtype", "bf16", "--deltaT", "10", "--batch-size", "32", "--seq-len", "128"],
               ["--quick", "--layers", "1", "--vocab-size", "1000", "--batch-size", "2", "--seq-len", "16",
                "--deltaT", "3", "--reps", "1", "--warmup", "0", "--dtype", "bf16"]),
    "svd": (bench_svd, ["--llama", "--spectra", "powerlaw"],
            ["--quick", "--layers", "1", "--hidden", "64", "--ffn", "256", "--methods", "full,auto", "--warmup", "0",
             "--reps", "1"]),
    "generate": (bench_generate, ["--models", "llama7b", "--layers", "4", "--dtypes", "bf16", "--ratios", "0.1,0.2"],
                 ["--quick", "--models", "llama7b", "--layers", "1", "--hidden-size", "64", "--intermediate-size",
                  "160", "--vocab-size", "128", "--prompt-len", "8", "--new-tokens", "4", "--ratios", "0.2",
                  "--dtypes", "bf16", "--warmup", "0", "--reps", "1"]),
    "deberta": (bench_inference, ["--models", "deberta"] + _INFER_MODELS,
                ["--models", "deberta"] + _INFER_MODELS_QUICK),
    "stack72_compiled": (bench_inference, ["--skip-models", "--skip-llama", "--dtypes", "bf16", "--ratios", "0.1,0.2",
                                           "--stack-tokens", "16384", "--skip-original", "--compile-modes",
                                           "none,reduce-overhead"],
                         _QUICK_STACKS + ["--skip-models", "--skip-llama", "--dtypes", "bf16", "--ratios", "0.2",
                                          "--skip-original", "--compile-modes", "none,reduce-overhead",
                                          "--compile-backend", "eager"]),
    # one Llama-3-8B-shape block: decode / prefill of the compacted block, then the one-shot pipeline stage by stage
    # (peak GPU memory per stage) and its projection to whole models
    "scale": (bench_scale, ["--shapes", "llama3-8b", "--context", "512,2048"],
              ["--quick", "--shapes", "tiny", "--kept", "0.5", "--warmup", "0", "--reps", "1"]),
    "scale_one_shot": (bench_scale, ["--one-shot", "--shapes", "llama3-8b", "--calib-tokens", "16x2048"],
                       ["--one-shot", "--quick", "--dtype", "fp32"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="Output folder (created): figures.jsonl and figures.md.")
    p.add_argument("--quick", action="store_true", help="CPU, tiny shapes, seconds per section (smoke run).")
    p.add_argument("--device", default=None, help="Default cuda (--quick: cpu).")
    p.add_argument("--sections", type=C.csv(str), default=list(SECTIONS), help=",".join(SECTIONS))
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="No section starts after this many seconds (default 480: 8 minutes).")
    args = p.parse_args(argv)
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad or not args.sections:
        p.error(f"--sections: unknown {bad or 'nothing'}; allowed: {', '.join(SECTIONS)}")
    args.device = args.device or ("cpu" if args.quick else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch.cuda.is_available() is False (use --quick for a CPU smoke run)")
    return args


class _Tee(io.TextIOBase):
    """stdout of a benchmark: each JSON line gets its ``section`` and goes to the JSONL file (flushed at once)
    and to the real stdout; any other line goes to stderr."""

    def __init__(self, out, section):
        self.out, self.section, self.buf = out, section, ""

    def writable(self):
        return True

    def write(self, s):
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self._line(line)
        return len(s)

    def _line(self, line):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            if line.strip():
                print(line, file=sys.stderr)
            return
        record(self.out, {"section": self.section, **rec})


def record(out, rec):
    line = json.dumps(rec, default=str)
    with open(out, "a") as f:
        f.write(line + "\n")
    print(line, file=sys.__stdout__, flush=True)


def run_section(name, argv, jsonl):
    module = SECTIONS[name][0]
    t0 = time.perf_counter()
    tee = _Tee(jsonl, name)
    # bench_train turns tf32 on for its step: the sections after it must not inherit that
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        with contextlib.redirect_stdout(tee):
            module.main(argv)
        status, extra = "ok", {}
    except (Exception, SystemExit) as e:  # noqa: BLE001  (one failed section must not stop the others)
        status = "error"
        extra = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    finally:
        if tee.buf:
            tee._line(tee.buf)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[:2]
        torch.set_float32_matmul_precision(flags[2])
        gc.collect()
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    record(jsonl, {"section": name, "what": "section" if status == "ok" else "error", "status": status,
                   "seconds": round(time.perf_counter() - t0, 1), "argv": argv, **extra})
    return status


# ---------------------------------------------------------------------------------------------- the table
def _fmt(v, unit=""):
    return "–" if v is None else f"{v:g}{unit}"


def _rows(recs):
    """(section, measurement, figure, ratio) for the table."""
    for r in recs:
        w = r.get("what")
        if w == "inference" or w in ("stack72", "stack_llama"):
            name = r.get("model") or w
            shape = "×".join(map(str, r.get("shape", [])))
            ratio = f"@{r['ratio']:g}" if r.get("ratio") else ""
            mode = r.get("compiled") or "eager"
            yield (r["section"], f"{name} {shape} {r.get('dtype')} {r['variant']}{ratio} {mode}", _fmt(r["ms"], " ms"),
                   f"{_fmt(r.get('speedup_vs_dense'), '×')} dense ({mode})")
        elif w == "train_step":
            yield (r["section"], f"train step {r['model']} {'×'.join(map(str, r['shape']))} {r['dtype']} "
                   f"{r['variant']}", _fmt(r["ms"], " ms"), f"{_fmt(r.get('vs_dense'), '×')} dense time")
        elif w == "pruner" and r.get("phase") == "average_step":
            yield (r["section"], f"pruner average step, deltaT {r['deltaT']}", _fmt(r["pruner_ms"], " ms"),
                   f"+{_fmt(r['overhead_pct'])} % of a step")
        elif w in ("svd", "svd_llama"):
            what = f"{r['matrices']} matrices" if w == "svd" else "×".join(map(str, r["shape"]))
            yield (r["section"], f"SVD {r['method']}, {what}", _fmt(r["seconds"], " s"),
                   f"{_fmt(r.get('speedup_vs_full'), '×')} full")
        elif w == "generate":
            yield (r["section"], f"decode {r['model']} {r['layers']} layers {r['dtype']} {r['variant']}",
                   _fmt(r["decode_tokens_per_s"], " tok/s"), f"{_fmt(r.get('decode_speedup'), '×')} dense")
        elif w in ("error", "skipped"):
            yield (r["section"], w.upper(), "", (r.get("error") or r.get("reason") or "")[:120])


def _find(recs, what, **kw):
    for r in recs:
        if r.get("what") == what and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _targets(recs):
    """The README's GPU targets (20 % unless said): (target, measured, met)."""
    out = []

    def check(label, rec, key, op, bound):
        v = None if rec is None else rec.get(key)
        met = None if v is None else (v >= bound if op == ">=" else v <= bound)
        out.append((label, _fmt(v), {None: "not measured", True: "met", False: "not met"}[met]))

    for mode in (False, "default", "reduce-overhead"):
        check(f"BERT-base b32×128 bf16 compacted ({mode or 'eager'}) ≥ 1.0× dense ({mode or 'eager'})",
              _find(recs, "inference", model="bert", variant="compact", compiled=mode), "speedup_vs_dense", ">=", 1.0)
    check("BERT-base compiled compacted ≥ 1.0× dense eager",
          _find(recs, "inference", model="bert", variant="compact", compiled="default"), "speedup_vs_dense_eager",
          ">=", 1.0)
    check("DeBERTa-v3-base b32×128 bf16 compacted ≥ 1.0× dense",
          _find(recs, "inference", model="deberta", variant="compact", compiled=False), "speedup_vs_dense", ">=",
          1.0)
    check("72-linear stack 16k ≥ 1.2× dense", _find(recs, "stack72", variant="compact", ratio=0.2, compiled=False),
          "speedup_vs_dense", ">=", 1.2)
    for ratio, bound in ((0.2, 2.5), (0.1, 4.0)):
        check(f"LLaMA-7B-size stack 16k at {ratio:g} ≥ {bound:g}× dense",
              _find(recs, "stack_llama", variant="compact", ratio=ratio, compiled=False), "speedup_vs_dense", ">=",
              bound)
    for dtype in ("fp32", "bf16"):
        check(f"training step ({dtype}) ≤ 1.15× dense time", _find(recs, "train_step", variant="losparse",
                                                                   dtype=dtype), "vs_dense", "<=", 1.15)
    check("pruner average overhead ≤ 3 %", _find(recs, "pruner", phase="average_step"), "overhead_pct", "<=", 3.0)
    check("SVD substitution (auto, 72 matrices) ≤ 0.5 s", _find(recs, "svd", method="auto"), "seconds", "<=", 0.5)
    return out


def write_table(jsonl, md):
    recs = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    env = _find(recs, "env") or {}
    lines = [f"# GPU figures ({env.get('device_name', '?')}, torch {env.get('torch', '?')}, transformers "
             f"{env.get('transformers', '?')}, {env.get('date', '?')}{', QUICK' if env.get('quick') else ''})", "",
             "| section | measurement | figure | ratio |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in _rows(recs)]
    lines += ["", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in _targets(recs)]
    Path(md).write_text("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, md = out / "figures.jsonl", out / "figures.md"
    jsonl.write_text("")
    # one section compiles up to 4 variants of a model (dense / compacted x 2 modes): room for their graphs, so
    # none falls back to eager silently
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    t0 = time.perf_counter()
    try:
        for name in args.sections:
            elapsed = time.perf_counter() - t0
            if elapsed > args.budget_s:
                record(jsonl, {"section": name, "what": "skipped", "reason": f"budget: {elapsed:.0f} s > "
                                                                             f"--budget-s {args.budget_s:g}"})
            else:
                _, full, quick = SECTIONS[name]
                run_section(name, (quick if args.quick else full) + ["--device", args.device], jsonl)
            write_table(jsonl, md)
    except KeyboardInterrupt:  # run_gpu.sh's timeout sends SIGINT: keep the table of what finished
        record(jsonl, {"section": "all", "what": "interrupted", "seconds": round(time.perf_counter() - t0, 1)})
        write_table(jsonl, md)
        return 130
    record(jsonl, {"section": "all", "what": "done", "seconds": round(time.perf_counter() - t0, 1)})
    write_table(jsonl, md)
    errors = sum(1 for line in jsonl.read_text().splitlines() if json.loads(line).get("what") == "error")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
