"""Print the LLM quickstart table from run_clm.py output directories (as loaded, full fine-tuning, LoSparse ratios).

For every run: perplexity (for LoSparse also the calibrated one-shot perplexity, before fine-tuning), stored
parameters, weights file, kept fraction of the substituted matrices; and CPU greedy generation speed (tokens/s, KV
cache) of the dense fine-tuned model and of each compacted LoSparse model (``utils.load_compact``). The last line is one JSON object with every figure.
"""
import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402

PROMPT = "The capital of France is"


def _weights_file(run_dir):
    for f in ("compact/losparse_model.safetensors", "compact/model.safetensors", "model.safetensors"):
        if (run_dir / f).is_file():
            return run_dir / f
    return None


@torch.no_grad()
def generation_speed(model, tokenizer, new_tokens, reps=2):
    """Greedy decoding of exactly ``new_tokens`` tokens after PROMPT with the KV cache: best tokens/s of ``reps``."""
    ids = tokenizer(PROMPT, return_tensors="pt")
    kw = dict(do_sample=False, use_cache=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    model.generate(**ids, **dict(kw, max_new_tokens=2, min_new_tokens=2))  # warm-up
    best, out = None, None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = model.generate(**ids, **kw)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return new_tokens / best, text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", nargs="+", required=True, help="name=run_dir; 'loaded' and 'full' are the dense runs")
    p.add_argument("--seconds", nargs="*", type=float, default=[], help="wall time of each run, in --runs order")
    p.add_argument("--gguf", help="the GGUF file the runs started from (its size is shown for 'loaded')")
    p.add_argument("--gen_tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    logging.getLogger("losparse").setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    rows = []
    for i, spec in enumerate(a.runs):
        name, run_dir = spec.split("=", 1)
        run_dir = Path(run_dir)
        res = json.loads((run_dir / "all_results.json").read_text())
        row = {"run": name, "perplexity": res["perplexity"], "eval_tokens": res["eval_tokens"],
               "params": res["model_params"], "dense_params": res["dense_equivalent_params"],
               "ratio": res["effective_ratio"], "steps": res["train_steps"],
               "one_shot_perplexity": res.get("one_shot_perplexity"),
               "seconds": a.seconds[i] if i < len(a.seconds) else None}
        weights = _weights_file(run_dir) if name != "loaded" else (Path(a.gguf) if a.gguf else None)
        row["file"] = None if weights is None else str(weights)
        row["bytes"] = None if weights is None else weights.stat().st_size
        if name == "loaded":
            row["tokens_per_s"], row["sample"] = None, None
        elif (run_dir / "compact").is_dir():
            model = utils.load_compact(run_dir / "compact", AutoModelForCausalLM)
            tok = AutoTokenizer.from_pretrained(run_dir / "compact", trust_remote_code=True)  # reads config.json
            row["tokens_per_s"], row["sample"] = generation_speed(model, tok, a.gen_tokens)
        else:
            model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
            tok = AutoTokenizer.from_pretrained(run_dir)
            row["tokens_per_s"], row["sample"] = generation_speed(model, tok, a.gen_tokens)
        rows.append(row)

    dense = next((r for r in rows if r["run"] == "full"), None)
    print(f"{'run':<22} {'perplexity':>10} {'one-shot':>9} {'parameters':>12} {'weights file':>13} "
          f"{'matrices kept':>14} {'tokens/s':>9} {'time':>6}")
    for r in rows:
        label = {"loaded": "as loaded (GGUF Q4_1)", "full": "full fine-tuning"}.get(r["run"])
        if label is None:
            parts = r["run"].split("_")
            label = f"LoSparse {parts[1]} + {parts[2]}" if len(parts) == 3 else r["run"]
        size = "" if r["bytes"] is None else f"{r['bytes'] / 2**20:.1f}MiB"
        speed = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
        if dense is not None and r is not dense and r["tokens_per_s"] is not None:
            speed += f" ({r['tokens_per_s'] / dense['tokens_per_s']:.2f}x)"
        t = "" if r["seconds"] is None else f"{r['seconds']:.0f}s"
        one_shot = "" if r["one_shot_perplexity"] is None else f"{r['one_shot_perplexity']:.2f}"
        print(f"{label:<22} {r['perplexity']:>10.2f} {one_shot:>9} {r['params']:>12,} {size:>13} "
              f"{100 * r['ratio']:>13.2f}% {speed:>9} {t:>6}")
    print(f"greedy continuations of {PROMPT!r}:")
    for r in rows:
        if r["sample"] is not None:
            print(f"  {r['run']:<20} {r['sample'][:100]!r}")
    print(json.dumps({"rows": rows, "prompt": PROMPT, "gen_tokens": a.gen_tokens, "threads": a.threads,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
