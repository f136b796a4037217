"""Training step: dense vs LoSparse (no pruner / + window step / + mask step), time, op count and memory.

One optimizer step = forward, backward, AdamW ``step``, ``zero_grad`` (and for the pruner variants
``pruner.update_and_pruning`` at a window or at a mask step). Models are base-size configs with random weights
(BERT-base, DeBERTa-v3-base, sequence classification); STEP 1 at low-rank 0.05 with dense S, as in training.
``losparse_factored`` is the same model with the merged-weight path switched off (the forward before it).

Printed beside each time: the aten ops of one forward + backward (``ops_fwd_bwd``; each op is a kernel launch
on a GPU, and the ratio to dense is the figure a CPU can improve), the pruner call's ops, the GEMMs whose sizes
are not multiples of 8 (bf16 tensor cores want them), the bytes autograd saves for backward (parameters
excluded) and, on CUDA, the peak memory of a step (``torch.cuda.max_memory_allocated``).

    python benchmarks/bench_train.py --quick                                     # CPU, a minute
    python benchmarks/bench_train.py --models bert --batch-size 8 --seq-len 128   # CPU, BERT-base b8 x 128
    python benchmarks/bench_train.py --device cuda --dtypes fp32,bf16             # tf32 and bf16 autocast

One JSON line per measurement (``what`` = env | train_step).
"""
import argparse
import contextlib
import copy

import torch

import _common as C
from _common import utils
import losparse.layer  # noqa: E402  (the repository root is on sys.path once _common is imported)
from _opcount import OpCounter, saved_activation_bytes

VARIANTS = ("dense", "losparse_factored", "losparse", "losparse_window_step", "losparse_mask_step")


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", type=C.csv(str), default=["bert", "deberta"], help="bert,deberta")
    p.add_argument("--layers", type=int, default=None, help="Encoder layers (default 12, quick 2).")
    p.add_argument("--batch-size", type=int, default=None, help="Default: cuda 32, cpu 8, quick 8.")
    p.add_argument("--seq-len", type=int, default=None, help="Default 128 (quick 64).")
    p.add_argument("--dtypes", type=C.csv(str), default=["fp32"],
                   help="fp32 (tf32 matmuls on CUDA) and/or bf16 (autocast over fp32 weights).")
    p.add_argument("--variants", type=C.csv(str), default=list(VARIANTS), help=",".join(VARIANTS))
    p.add_argument("--vocab-size", type=int, default=None,
                   help="Override the vocabulary (quick: 8000; AdamW on a 128k embedding dominates a CPU step).")
    args = C.setup(p.parse_args(argv), warmup=(2, 1), reps=(5, 2))
    cuda = args.device.type == "cuda"
    args.layers = args.layers or (2 if args.quick else None)
    args.batch_size = args.batch_size or (8 if args.quick else 32 if cuda else 8)
    args.seq_len = args.seq_len or (64 if args.quick else 128)
    args.vocab_size = args.vocab_size or (8000 if args.quick else None)
    for v in args.variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
    for d in args.dtypes:
        if d not in ("fp32", "bf16"):
            raise SystemExit(f"--dtypes: unknown {d!r}; choose from fp32, bf16")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return args


@contextlib.contextmanager
def factored(on):
    """Switch the merged-weight training forward off (the forward before it) while ``on``."""
    merge = losparse.layer.merge_pays
    if on:
        losparse.layer.merge_pays = lambda *a: False
    try:
        yield
    finally:
        losparse.layer.merge_pays = merge


def pruner_args(deltaT=10):
    return utils.add_losparse_args(argparse.ArgumentParser()).parse_args(
        ["--deltaT", str(deltaT), "--initial_warmup", "0", "--final_warmup", "0", "--warmup_steps", "1",
         "--final_threshold", "0.1"])


class Setup:
    """A model, its optimizer and batch, and the step function of one variant."""

    def __init__(self, base, variant, args, dtype):
        self.model = copy.deepcopy(base)
        self.variant = variant
        if variant != "dense":
            utils.substitute_layer_weights(self.model, C.ALLOW_NAME, C.BLOCK_NAME, parameter_ratio=C.LOW_RANK_RATIO,
                                           svd="auto", log_level="IGNORE")
        self.model.to(args.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        name = "deberta" if "Deberta" in type(base).__name__ else "bert"
        self.batch = C.model_inputs(name, args.batch_size, args.seq_len, self.model.config.vocab_size, args.device)
        self.batch["labels"] = torch.randint(0, 2, (args.batch_size,), device=args.device)
        self.autocast = torch.autocast(args.device.type, dtype=C.DTYPES[dtype], enabled=dtype != "fp32")
        self.pruner = None
        self.pruner_step = None
        if variant in ("losparse_window_step", "losparse_mask_step"):
            self.pruner = utils.Pruner(self.model, pruner_args(10), total_step=1000)
            self.pruner_step = 13 if variant == "losparse_window_step" else 20  # a mask step at kept 0.97
        self.factored = variant == "losparse_factored"

    def forward_backward(self):
        with self.autocast:
            loss = self.model(**self.batch).loss
        loss.backward()

    def __call__(self):
        with factored(self.factored):
            self.forward_backward()
        self.optimizer.step()
        if self.pruner is not None:
            self.pruner.update_and_pruning(self.model, self.pruner_step)
        self.optimizer.zero_grad(set_to_none=True)


def measure_ops(s):
    """Ops of one forward + backward, and of the pruner call on the gradients it left."""
    with factored(s.factored), OpCounter() as fb:
        s.forward_backward()
    pruner_ops = None
    if s.pruner is not None:
        s.pruner.update_and_pruning(s.model, 1)  # lays out the statistics once
        with OpCounter() as pc:
            s.pruner.update_and_pruning(s.model, s.pruner_step)
        pruner_ops = pc.total
    s.optimizer.zero_grad(set_to_none=True)
    return fb, pruner_ops


def saved_bytes(s):
    """Bytes autograd keeps for backward (activations; parameters excluded, each storage once)."""
    with factored(s.factored):
        n = saved_activation_bytes(s.forward_backward, s.model.parameters())
    s.optimizer.zero_grad(set_to_none=True)
    return n


def main(argv=None):
    args = parse_args(argv)
    C.emit_env(args, "bench_train")
    for model_name in args.models:
        base = C.build_model(model_name, args.layers, head="seq_cls", seed=args.seed, vocab_size=args.vocab_size)
        for dtype in args.dtypes:
            setups = {v: Setup(base, v, args, dtype) for v in args.variants}
            times = C.time_variants(setups, args.device, args.warmup, args.reps)
            dense_ms = times.get("dense", {}).get("ms")
            dense_ops = None
            for v, s in setups.items():
                fb, pruner_ops = measure_ops(s)
                masked = len(s.pruner._masked_params(s.model)) if s.pruner is not None else None
                if v == "dense":
                    dense_ops = fb.total
                peak = C.peak_memory(s, args.device)
                C.emit("train_step", model=model_name, variant=v, dtype=dtype, device=str(args.device),
                       shape=[args.batch_size, args.seq_len], layers=base.config.num_hidden_layers,
                       ms=times[v]["ms"], ms_min=times[v]["ms_min"],
                       vs_dense=None if dense_ms is None else round(times[v]["ms"] / dense_ms, 3),
                       ops_fwd_bwd=fb.total, kernels_fwd_bwd=fb.kernels,
                       ops_vs_dense=None if dense_ops is None else round(fb.total / dense_ops, 3),
                       gemms=len(fb.gemms), gemms_not_multiple_of_8=len(fb.misaligned_gemms()),
                       pruner_ops=pruner_ops, masked_matrices=masked,
                       pruner_ops_per_matrix=None if pruner_ops is None else round(pruner_ops / masked, 2),
                       saved_activation_bytes=saved_bytes(s),
                       peak_bytes=None if peak is None else peak["peak_bytes"])
            del setups


if __name__ == "__main__":
    main()
