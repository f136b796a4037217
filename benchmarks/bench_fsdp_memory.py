"""Memory per rank of LoSparse training sharded with FSDP2 (``utils.apply_fsdp2``) over 1, 2, 4, ... processes.

A BERT config (random weights, sequence classification) goes through STEP 1 (low-rank 0.05, dense S, as during
training), is sharded with FSDP2 over W processes (W = 1: not sharded, the single-GPU baseline) and trains a few
steps with AdamW and the Pruner (window and mask steps), the global batch split over the ranks. Per rank:

- ``state_mib``: exact bytes of what lives through the run on this rank: the local rows of every parameter, the
  AdamW states and the Pruner's statistics (gradients come and go: they are as large as the local parameters);
- ``peak_mib``: the peak memory in use over the training steps: on CUDA ``torch.cuda.max_memory_allocated``
  (parameters, gradients, AdamW states, activations, FSDP2 all-gather / reduce-scatter buffers, the Pruner); on
  CPU the peak of the C heap in use (glibc ``mallinfo2``: ``uordblks + hblkhd``, every arena and thread, which
  is where torch's CPU allocator takes its memory), sampled every 0.2 ms by a thread. It counts the whole
  process (Python objects and the runtime's own allocations too, a constant across ranks counts), but not the
  blocks freed and kept by the heap, unlike the resident set size;
- ``rss_peak_mib`` (CPU): the peak resident set size over the steps (``VmHWM``, reset with /proc/self/clear_refs
  just before them), for completeness: it also counts the heap's free blocks, e.g. those of the full model each
  rank builds before sharding it, so it does not show the sharding well.

    python benchmarks/bench_fsdp_memory.py --quick                       # CPU gloo, 1/2/4 processes, ~1 min
    python benchmarks/bench_fsdp_memory.py --device cuda --ranks 1,2,4,8 # one process per GPU

One JSON line per measurement (``what`` = env | fsdp_memory_rank | fsdp_memory), ratios against W = 1.
"""
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import _common as C
from _common import utils
import losparse.common  # noqa: E402  (the repository root is on sys.path once _common is imported)


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--ranks", type=C.csv(int), default=[1, 2, 4], help="Process counts, e.g. 1,2,4.")
    p.add_argument("--layers", type=int, default=None, help="Encoder layers (default 12, quick 4).")
    p.add_argument("--vocab-size", type=int, default=None, help="Default 30522 (quick 1000).")
    p.add_argument("--batch-size", type=int, default=None, help="Global batch (default 32, quick 8).")
    p.add_argument("--seq-len", type=int, default=None, help="Default 128 (quick 64).")
    p.add_argument("--steps", type=int, default=6, help="Training steps (the Pruner masks at 4 of them).")
    p.add_argument("--worker", default=None, help=argparse_suppress())
    args = C.setup(p.parse_args(argv), warmup=(0, 0), reps=(0, 0))
    args.layers = args.layers or (4 if args.quick else 12)
    args.vocab_size = args.vocab_size or (1000 if args.quick else 30522)
    args.batch_size = args.batch_size or (8 if args.quick else 32)
    args.seq_len = args.seq_len or (64 if args.quick else 128)
    for w in args.ranks:
        if w < 1 or args.batch_size % w:
            raise SystemExit(f"--ranks {w}: needs a divisor of --batch-size {args.batch_size}")
        if args.device.type == "cuda" and w > torch.cuda.device_count():
            raise SystemExit(f"--ranks {w}: only {torch.cuda.device_count()} GPUs")
    return args


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


def _status(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


class _HeapPeak:
    """Peak of glibc's heap in use (``mallinfo2``: ``uordblks + hblkhd``), sampled by a thread while inside."""

    def __init__(self, interval=2e-4):
        import ctypes

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]

        self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        self._mallinfo2.restype = Info
        self.interval, self.peak = interval, 0

    def in_use(self):
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.in_use())
            time.sleep(self.interval)

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self.peak = self.in_use()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.in_use())


def _bytes(t):
    t = losparse.common.local_part(t)
    return t.numel() * t.element_size()


def worker(args):
    """One rank: STEP 1, FSDP2, AdamW + Pruner steps; writes its figures to ``args.worker``/rank<r>.json."""
    import argparse

    if "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("nccl" if args.device.type == "cuda" else "gloo")
    dist = torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    device = args.device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    model = C.build_model("bert", args.layers, head="seq_cls", vocab_size=args.vocab_size, seed=args.seed)
    utils.substitute_layer_weights(model, C.ALLOW_NAME, C.BLOCK_NAME, parameter_ratio=C.LOW_RANK_RATIO, svd="auto",
                                   log_level="IGNORE")
    total_params = C.num_params(model)
    model = utils.apply_fsdp2(model) if world > 1 else model.to(device)  # forwards to utils_fsdp.py
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    parser = argparse.ArgumentParser()
    utils.add_losparse_args(parser)
    pargs = parser.parse_args(["--final_threshold", "0.3", "--warmup_steps", "1", "--initial_warmup", "1",
                               "--final_warmup", "1", "--deltaT", "2"])
    pruner = utils.Pruner(model, pargs, total_step=args.steps)
    inputs = C.model_inputs("bert", args.batch_size, args.seq_len, args.vocab_size, device)
    per = args.batch_size // world
    inputs = {k: v[rank * per:(rank + 1) * per] for k, v in inputs.items()}
    labels = torch.arange(per, device=device) % 2
    gc.collect()

    def train():
        for step in range(args.steps):
            model(**inputs, labels=labels).loss.backward()
            optimizer.step()
            pruner.update_and_pruning(model, step)
            optimizer.zero_grad()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        train()
        torch.cuda.synchronize(device)
        peak, rss = torch.cuda.max_memory_allocated(device), None
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        with _HeapPeak() as heap:
            train()
        rss, peak = _status("VmHWM"), heap.peak
    state = sum(_bytes(p) for p in model.parameters())
    state += sum(_bytes(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    state += sum(t.numel() * t.element_size() for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc")  # the flat buffers
                 for t in getattr(pruner, kind).values())
    out = {"ranks": world, "rank": rank, "params": total_params,
           "local_params": sum(losparse.common.local_part(p).numel() for p in model.parameters()),
           "state_mib": round(state / 2**20, 1), "peak_mib": round(peak / 2**20, 1),
           "rss_peak_mib": None if rss is None else round(rss / 2**20, 1)}
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(out))
    if dist:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    C.emit_env(args, "bench_fsdp_memory.py")
    passthrough = ["--device", str(args.device.type), "--layers", str(args.layers), "--vocab-size",
                   str(args.vocab_size), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--steps", str(args.steps), "--seed", str(args.seed)]
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = str(C.ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    rows = {}
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            launcher = [] if world == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                              str(world)]
            cmd = [sys.executable, *launcher, str(Path(__file__).resolve()), *passthrough, "--worker", tmp]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-5000:])
                raise SystemExit(f"{world} processes: exit {proc.returncode}")
            ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
        for r in ranks:
            C.emit("fsdp_memory_rank", model=f"bert-{args.layers}l", device=args.device.type, **r)
        rows[world] = {k: max(r[k] for r in ranks) for k in ("state_mib", "peak_mib")}
        ref = rows[min(rows)]
        C.emit("fsdp_memory", model=f"bert-{args.layers}l", device=args.device.type, ranks=world,
               params=ranks[0]["params"], batch=args.batch_size, seq=args.seq_len,
               max_state_mib=rows[world]["state_mib"], max_peak_mib=rows[world]["peak_mib"],
               state_vs_1=round(rows[world]["state_mib"] / ref["state_mib"], 3),
               peak_vs_1=round(rows[world]["peak_mib"] / ref["peak_mib"], 3),
               peak_measure="torch.cuda.max_memory_allocated" if args.device.type == "cuda" else
               "peak C heap in use over the steps (glibc mallinfo2 uordblks + hblkhd, sampled every 0.2 ms)")


if __name__ == "__main__":
    main()
