"""Print the quickstart table from two run_glue.py output directories (full fine-tuning vs LoSparse)."""
import argparse
import json
from pathlib import Path


def _size(path):
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files)


def summarize(run_dir, weights):
    run_dir = Path(run_dir)
    res = json.loads((run_dir / "all_results.json").read_text())
    weight_files = [run_dir / w for w in weights if (run_dir / w).exists()]
    return {"accuracy": res.get("eval_accuracy"), "params": res.get("model_params"),
            "dense_params": res.get("dense_equivalent_params"), "ratio": res.get("effective_ratio"),
            "bytes": sum(_size(f) for f in weight_files), "steps": res.get("train_steps")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--full", required=True)
    p.add_argument("--losparse", required=True)
    p.add_argument("--seconds_full", type=float)
    p.add_argument("--seconds_losparse", type=float)
    a = p.parse_args(argv)
    full = summarize(a.full, ["model.safetensors"])
    los = summarize(a.losparse, ["compact/losparse_model.safetensors"])
    rows = [("full fine-tuning", full, a.seconds_full), ("LoSparse 20 %", los, a.seconds_losparse)]
    print(f"{'run':<18} {'accuracy':>9} {'parameters':>12} {'weights file':>13} {'matrices kept':>14} {'time':>7}")
    for name, r, sec in rows:
        acc = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        ratio = "100.00%" if name.startswith("full") else f"{100 * r['ratio']:.2f}%"
        t = "" if sec is None else f"{sec:.0f}s"
        print(f"{name:<18} {acc:>9} {r['params']:>12,} {r['bytes'] / 2**20:>10.1f}MiB {ratio:>14} {t:>7}")
    print(f"LoSparse model: {los['params'] / full['params']:.1%} of the parameters, "
          f"{los['bytes'] / max(1, full['bytes']):.1%} of the file size of the fine-tuned dense model")
    print(json.dumps({"full": full, "losparse": los, "seconds_full": a.seconds_full,
                      "seconds_losparse": a.seconds_losparse}))


if __name__ == "__main__":
    main()
