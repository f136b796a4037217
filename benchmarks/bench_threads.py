"""Training-step time of a SmolLM2-135M-shaped decoder (random weights, fp32, CPU) at several thread counts, on a
machine that other processes keep busy: why the LLM quickstart test runs its processes on one thread.

Each measurement runs in a fresh process with ``OMP_NUM_THREADS`` set (torch reads it at start-up); ``--busy N``
starts N busy-loop processes for the whole benchmark, like other jobs on a shared machine. A measurement that does
not finish in ``--timeout`` seconds is reported with ``"timed_out": true``. One JSON line per measurement.

    python benchmarks/bench_threads.py --threads 1,2 --busy 2 --steps 3
"""
import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
steps = int(sys.argv[1])
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
x = torch.randint(0, cfg.vocab_size, (4, 32))  # the quickstart's batch: 4 blocks of 32 tokens
for _ in range(steps):
    t = time.perf_counter()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    print(json.dumps({"step_s": round(time.perf_counter() - t, 3)}), flush=True)
"""


def _busy():
    while True:
        pass


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--busy", type=int, default=0, help="busy-loop processes running meanwhile")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement (model build included)")
    a = p.parse_args(argv)
    busy = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(a.busy)]
    for b in busy:
        b.start()
    try:
        for n in [int(t) for t in a.threads.split(",")]:
            env = dict(os.environ, OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n), HF_HUB_OFFLINE="1")
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-c", CHILD, str(a.steps)], env=env, stdout=subprocess.PIPE,
                                    text=True)
            try:
                out, _ = proc.communicate(timeout=a.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                timed_out = True
            steps = [json.loads(line)["step_s"] for line in out.splitlines() if line.startswith("{")]
            print(json.dumps({"what": "train_step", "model": "smollm2-135m-shape", "batch": "4x32", "dtype": "fp32",
                              "device": "cpu", "cpus": os.cpu_count(), "threads": n, "busy_processes": a.busy,
                              "load_avg_1min": round(os.getloadavg()[0], 2), "step_s": steps,
                              "wall_s": round(time.monotonic() - start, 1), "timed_out": timed_out}), flush=True)
    finally:
        for b in busy:
            b.terminate()


if __name__ == "__main__":
    main()
