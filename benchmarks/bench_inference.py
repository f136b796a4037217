"""Inference speed and size: dense vs original-style (uncompacted LoSparse) vs compacted.

Models are base-size configs with random weights (BERT-base, DeBERTa-v3-base, BART-base). A "pruned"
model is made without training: low-rank 0.05 plus the rows of each S with the largest norm, so that
the total kept fraction is the target ratio; then ``utils.prune`` compacts it. Each dtype converts fresh
copies of the fp32 models (never a model already rounded to another dtype). Two linear stacks are timed
too, each layer's output feeding the next (with residual adds, as in a transformer), so activations are not
re-read from cache: the 72 linears of a DeBERTa-v3-base-sized encoder (per layer q, k, v, o 768x768, ffn
768->3072 and 3072->768) and LLaMA-7B-size blocks (q, k, v, o 4096x4096, gate/up 4096->11008, down
11008->4096). ``export_compact``'s file is compared with a size predicted from the layer shapes and kept rows,
and reloaded. Aten ops per forward and the GEMM shapes inside the compacted layers are counted with a
``TorchDispatchMode``; each compacted variant reports the inference path its layers took.

    python benchmarks/bench_inference.py --quick                   # CPU, a few minutes
    python benchmarks/bench_inference.py --device cuda --dtypes bf16,fp16,fp32 --batch-sizes 1,8,32

One JSON line per measurement (``what`` = env | inference | ops | export | stack72 | stack_llama).
"""
import collections
import copy
import tempfile

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import _common as C
from _common import utils


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", type=C.csv(str), default=None, help="bert,deberta,bart (quick: bert).")
    p.add_argument("--ratios", type=C.csv(float), default=None,
                   help="Total kept fractions, low-rank 0.05 included (quick: 0.2).")
    p.add_argument("--batch-sizes", type=C.csv(int), default=None, help="Default 1,8 (cuda 1,8,32; quick 1,8).")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtypes", type=C.csv(str), default=None, help="fp32,bf16 (quick: fp32).")
    p.add_argument("--layers", type=int, default=None, help="Override the number of layers (smoke tests).")
    p.add_argument("--vocab-size", type=int, default=None, help="Override the vocabulary (smoke tests).")
    p.add_argument("--stack-tokens", type=int, default=None, help="Tokens of the 72-linear stack (cuda 16384, "
                   "cpu 2048, quick 512).")
    p.add_argument("--stack-ratios", type=C.csv(float), default=None, help="Default: --ratios.")
    p.add_argument("--llama-tokens", type=int, default=None, help="Tokens of the LLaMA-7B-size block stack "
                   "(cuda 16384, cpu 512).")
    p.add_argument("--llama-blocks", type=int, default=2, help="LLaMA-7B-size blocks in that stack.")
    p.add_argument("--skip-models", action="store_true", help="Only the linear stacks.")
    p.add_argument("--skip-stack", action="store_true", help="Skip the 72-linear stack.")
    p.add_argument("--skip-llama", action="store_true", help="Skip the LLaMA-7B-size stack (--quick skips it).")
    p.add_argument("--no-export", action="store_true", help="Skip export_compact size and reload checks.")
    p.add_argument("--prefer", default="speed", choices=utils.PREFER_CHOICES,
                   help="utils.prune(prefer=...): 'memory' never builds the merged dense weight.")
    p.add_argument("--compile", action="store_true", help="torch.compile every variant (timed after warm-up); "
                   "the same as --compile-modes default.")
    p.add_argument("--compile-modes", type=C.csv(str), default=None,
                   help="Time each variant under each of these, side by side: none (eager), default "
                        "(torch.compile), reduce-overhead (torch.compile with CUDA graphs). Compiled compacted "
                        "variants go through utils.prepare_for_inference first. Default: none (--compile: default).")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (inductor; 'eager' or 'aot_eager' trace only, for smoke tests: the "
                        "mode then only names the variant).")
    p.add_argument("--skip-original", action="store_true", help="Leave out the uncompacted LoSparse variant.")
    p.add_argument("--llama-hidden", type=int, default=4096, help="Hidden size of the LLaMA-size stack.")
    p.add_argument("--llama-ffn", type=int, default=11008, help="MLP size of the LLaMA-size stack.")
    args = C.setup(p.parse_args(argv), warmup=(2, 1), reps=(7, 3))
    cuda = args.device.type == "cuda"
    args.models = args.models or (["bert"] if args.quick else ["bert", "deberta", "bart"])
    args.ratios = args.ratios or ([0.2] if args.quick else [0.1, 0.2, 0.4])
    args.batch_sizes = args.batch_sizes or ([1, 8] if args.quick or not cuda else [1, 8, 32])
    args.dtypes = args.dtypes or (["fp32"] if args.quick else ["fp32", "bf16"])
    for dt in args.dtypes:
        if dt not in C.DTYPES:
            raise SystemExit(f"--dtypes: unknown {dt!r}; allowed: {', '.join(C.DTYPES)}")
    args.stack_tokens = args.stack_tokens or (512 if args.quick else 16384 if cuda else 2048)
    args.stack_ratios = args.stack_ratios or args.ratios
    args.skip_llama = args.skip_llama or (args.quick and args.llama_tokens is None)
    args.llama_tokens = args.llama_tokens or (16384 if cuda else 512)
    args.compile_modes = args.compile_modes or (["default"] if args.compile else ["none"])
    for mode in args.compile_modes:
        if mode not in COMPILE_MODES:
            raise SystemExit(f"--compile-modes: unknown {mode!r}; allowed: {', '.join(COMPILE_MODES)}")
    return args


COMPILE_MODES = ("none", "default", "reduce-overhead")


# ---------------------------------------------------------------------------------------------- helpers
VIEW_OPS = {"view", "_unsafe_view", "reshape", "slice", "t", "transpose", "expand", "select", "permute", "unsqueeze",
            "squeeze", "as_strided", "alias", "detach", "split", "unbind"}


class OpCounter(TorchDispatchMode):
    """Counts aten ops (views included; ``compute_ops`` leaves them out). GEMMs (mm/addmm/bmm) run inside a
    LinearLoSparse are checked for an inner or output size that is not a multiple of 8 (off the tensor-core
    fast path in bf16/fp16)."""

    def __init__(self):
        super().__init__()
        self.ops, self.inside, self.gemms, self.misaligned = collections.Counter(), False, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if self.inside and name in ("mm", "addmm", "bmm"):
            a, b = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
            self.gemms += 1
            if any(s % 8 for s in (a.shape[-1], a.shape[-2], b.shape[-1])):  # inner, both output sizes
                self.misaligned.append((name, tuple(a.shape), tuple(b.shape)))
        return func(*args, **(kwargs or {}))


def count_ops(model, call):
    """One forward under :class:`OpCounter` (after one untimed call that builds derived tensors)."""
    mode = OpCounter()
    hooks = []
    for m in model.modules():
        if isinstance(m, utils.LinearLoSparse):
            hooks.append(m.register_forward_pre_hook(lambda *a: setattr(mode, "inside", True)))
            hooks.append(m.register_forward_hook(lambda *a: setattr(mode, "inside", False)))
    with torch.no_grad():  # (inference_mode would hide the ops inside composite ops such as aten.linear)
        call(model)
        with mode:
            call(model)
    for h in hooks:
        h.remove()
    return mode


def path_counts(model):
    """``{path: layers}`` from compression_report (the paths the compacted layers took)."""
    return dict(collections.Counter(l["path"] for l in utils.compression_report(model).layers))


def predicted_export_bytes(dense, original, keep_fraction):
    """File size of a compact export (fp32), from the layer shapes and the kept rows alone: 4 bytes per stored
    parameter (L, R, kept rows, biases, every other parameter) plus 8 per kept-row index. A layer whose
    compact form is not smaller than dense is stored dense. Header bytes are not counted."""
    params, idx = C.num_params(dense), 0
    for m in original.modules():
        if isinstance(m, utils.LinearLoSparse):
            i, o, r = m.in_feature, m.out_feature, m.reduced_rank
            k = min(o, max(0, round(keep_fraction * o))) if m.has_sparse else 0
            compact = r * (i + o) + k * i
            if compact < i * o:
                params += compact - i * o
                idx += k
    return 4 * params + 8 * idx


def fresh(master, device, dtype, mode="none", backend="inductor", tokens=None):
    """A copy of the fp32 master on ``device`` in ``dtype`` (the master is never converted in place), compiled
    unless ``mode`` is ``"none"``; a compiled compacted copy is prepared first (``utils.prepare_for_inference``
    for ``tokens`` rows per call), so its graph reads derived tensors instead of building them per call."""
    m = copy.deepcopy(master).to(device=device, dtype=dtype).eval()
    if mode in (None, "none", False):
        return m
    if any(isinstance(l, utils.LinearLoSparse) and l.is_compacted for l in m.modules()):
        utils.prepare_for_inference(m, tokens=tokens)
    if backend != "inductor":
        return torch.compile(m, backend=backend)
    return torch.compile(m, mode=None if mode == "default" else mode)


def compiled_variants(masters, args, dtype, tokens):
    """``{key: model}``: every master under every ``--compile-modes`` entry (key ``name`` or ``name~mode``)."""
    return {k if mode == "none" else f"{k}~{mode}": fresh(m, args.device, dtype, mode, args.compile_backend, tokens)
            for mode in args.compile_modes for k, m in masters.items()}


def isolated_peak_memory(masters, device, dtype, call):
    """CUDA: peak bytes of each variant alone on the device (weights + one forward); None on CPU."""
    if device.type != "cuda":
        return {k: None for k in masters}
    out = {}
    for k, master in masters.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        m = fresh(master, device, dtype)
        weights = torch.cuda.memory_allocated(device) - base
        with torch.inference_mode():
            call(m)
            call(m)
        C.sync(device)
        out[k] = {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "weights_bytes": weights}
        del m
    torch.cuda.empty_cache()
    return out


def emit_compare(what, res, params, mem, paths, tokens, dense_flops=None, **fields):
    """One line per variant; ``speedup_vs_dense`` is against dense treated the same way (eager or the same
    compile mode), ``speedup_vs_dense_eager`` against eager dense."""
    for k, r in res.items():
        base, _, mode = k.partition("~")
        variant, _, ratio = base.partition("@")
        same = lambda name: res.get(name + ("~" + mode if mode else ""))  # noqa: E731
        extra = {"peak_memory": mem[base]} if mem.get(base) else {}
        if dense_flops:
            extra["dense_equivalent_tflops"] = round(dense_flops / r["ms"] / 1e9, 3)
        if k in paths:
            extra["paths"] = paths[k]
        C.emit(what, variant=variant, ratio=float(ratio) if ratio else None, **fields, compiled=mode or False,
               ms=r["ms"], ms_min=r["ms_min"], tokens_per_s=round(1e3 * tokens / r["ms"], 1), params=params[base],
               speedup_vs_dense=round(same("dense")["ms"] / r["ms"], 3) if same("dense") else None,
               speedup_vs_dense_eager=round(res["dense"]["ms"] / r["ms"], 3) if "dense" in res else None,
               speedup_vs_original=round(same("original")["ms"] / r["ms"], 3) if same("original") else None,
               **extra)


# ----------------------------------------------------------------------------------------------- models
def bench_export(args, name, ratio, dense, original, compact, inputs):
    """Write the compact fp32 model, compare the file to the predicted size, reload and compare outputs."""
    rep = utils.compression_report(compact)
    predicted = predicted_export_bytes(dense, original, ratio - C.LOW_RANK_RATIO)
    with tempfile.TemporaryDirectory() as d:
        utils.export_compact(compact, d)
        actual = utils.compression_report(compact, export_dir=d).files[utils.COMPACT_WEIGHTS]
        reloaded = utils.load_compact(d, device=args.device, prefer=args.prefer)
        m = copy.deepcopy(compact).to(args.device)
        with torch.no_grad():
            a, b = m(**inputs)[0], reloaded(**inputs)[0]
    C.emit("export", model=name, ratio=ratio, dtype="fp32", device=str(args.device), predicted_bytes=predicted,
           actual_bytes=actual, diff_pct=round(100 * (actual - predicted) / predicted, 3),
           dense_equivalent_bytes=4 * rep.model_params_dense_equivalent,
           size_vs_dense=round(actual / (4 * rep.model_params_dense_equivalent), 4),
           reload_max_abs_diff=float((a - b).abs().max()), linears=len(rep.layers),
           effective_ratio=round(rep.effective_ratio, 4))


def bench_models(args):
    for name in args.models:
        dense = C.build_model(name, args.layers, seed=args.seed, vocab_size=args.vocab_size).eval()
        original, compact = C.losparse_variants(dense, args.ratios, prefer=args.prefer)
        vocab = dense.config.vocab_size
        if not args.no_export:
            small = C.model_inputs(name, 2, 16, vocab, args.device)
            for ratio, m in compact.items():
                bench_export(args, name, ratio, dense, original, m, small)
        masters = {"dense": dense, **({} if args.skip_original else {"original": original})}
        masters.update({f"compact@{r:g}": m for r, m in compact.items()})
        params = {k: C.num_params(m) for k, m in masters.items()}
        for dt in args.dtypes:
            dtype = C.DTYPES[dt]
            for batch in args.batch_sizes:
                inputs = C.model_inputs(name, batch, args.seq_len, vocab, args.device)
                call = lambda m: m(**inputs)  # noqa: E731
                mem = isolated_peak_memory(masters, args.device, dtype, call)
                variants = compiled_variants(masters, args, dtype, batch * args.seq_len)
                with torch.inference_mode():
                    fns = {k: (lambda m=m: call(m)) for k, m in variants.items()}
                    res = C.time_variants(fns, args.device, args.warmup, args.reps)
                paths = {k: path_counts(m) for k, m in variants.items() if k.startswith("compact")}
                emit_compare("inference", res, params, mem, paths, batch * args.seq_len, model=name,
                             shape=[batch, args.seq_len], dtype=dt, device=str(args.device))
                del variants
                eager = {k: fresh(m, args.device, dtype) for k, m in masters.items() if k != "original"}
                counts = {k: count_ops(m, call) for k, m in eager.items()}
                dense_ops = sum(counts["dense"].ops.values())
                compute = {k: sum(v for o, v in c.ops.items() if o not in VIEW_OPS) for k, c in counts.items()}
                for k, c in counts.items():
                    if k == "dense":
                        continue
                    total = sum(c.ops.values())
                    C.emit("ops", model=name, variant=k.partition("@")[0], ratio=float(k.partition("@")[2]),
                           shape=[batch, args.seq_len], dtype=dt, aten_ops=total, dense_aten_ops=dense_ops,
                           ops_vs_dense=round(total / dense_ops, 3), compute_ops=compute[k],
                           dense_compute_ops=compute["dense"],
                           compute_ops_vs_dense=round(compute[k] / compute["dense"], 3), cat=c.ops["cat"], dense_cat=counts["dense"].ops["cat"],
                           index_add=c.ops["index_add_"], compacted_gemms=c.gemms,
                           misaligned_gemms=len(c.misaligned), misaligned_examples=c.misaligned[:3],
                           paths=path_counts(eager[k]))
                del eager, counts
        del dense, original, compact, masters


# ----------------------------------------------------------------------------------------------- stacks
class _Block(nn.Module):
    """One transformer block's linears, chained: x += o(v(k(q(x)))); x += ffn2(ffn1(x)) (or, gated,
    x += down(gate(x) * up(x)))."""

    def __init__(self, hidden, ffn, gated):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=not gated) for _ in range(4))
        self.gated = gated
        if gated:
            self.gate, self.up = nn.Linear(hidden, ffn, bias=False), nn.Linear(hidden, ffn, bias=False)
            self.down = nn.Linear(ffn, hidden, bias=False)
        else:
            self.ffn1, self.ffn2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x):
        x = x + self.o(self.v(self.k(self.q(x))))
        if self.gated:
            return x + self.down(self.gate(x) * self.up(x))
        return x + self.ffn2(self.ffn1(x))


class LinearStack(nn.Module):
    """``layers`` blocks of linears; each layer's output feeds the next one."""

    def __init__(self, layers=12, hidden=768, ffn=3072, gated=False):
        super().__init__()
        self.layers = nn.ModuleList(_Block(hidden, ffn, gated) for _ in range(layers))

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


STACK_NAMES = ["q", "k", "v", "o", "ffn1", "ffn2", "gate", "up", "down"]


def bench_stack(args, what, layers, hidden, ffn, gated, tokens, with_original):
    torch.manual_seed(args.seed)
    dense = LinearStack(layers, hidden, ffn, gated).eval()
    original, compact = C.losparse_variants(dense, args.stack_ratios, allow_name=STACK_NAMES, block_name=[],
                                            prefer=args.prefer)
    linears = [m for m in dense.modules() if isinstance(m, nn.Linear)]
    dense_flops = 2 * tokens * sum(m.in_features * m.out_features for m in linears)
    with_original = with_original and not args.skip_original
    masters = {"dense": dense, **({"original": original} if with_original else {})}
    masters.update({f"compact@{r:g}": m for r, m in compact.items()})
    if not with_original:
        del original
    params = {k: C.num_params(m) for k, m in masters.items()}
    for dt in args.dtypes:
        dtype = C.DTYPES[dt]
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(args.device, dtype)
        call = lambda m: m(x)  # noqa: E731
        mem = isolated_peak_memory(masters, args.device, dtype, call)
        variants = compiled_variants(masters, args, dtype, tokens)
        with torch.inference_mode():
            fns = {k: (lambda m=m: call(m)) for k, m in variants.items()}
            res = C.time_variants(fns, args.device, args.warmup, args.reps)
        paths = {k: path_counts(m) for k, m in variants.items() if k.startswith("compact")}
        emit_compare(what, res, params, mem, paths, tokens, dense_flops, linears=len(linears), shape=[tokens, hidden],
                     dtype=dt, device=str(args.device))
        del variants


def main(argv=None):
    args = parse_args(argv)
    C.emit_env(args, "bench_inference")
    if not args.skip_models:
        bench_models(args)
    if not args.skip_stack:
        bench_stack(args, "stack72", args.layers or 12, 768, 3072, False, args.stack_tokens, True)
    if not args.skip_llama:
        bench_stack(args, "stack_llama", args.llama_blocks, args.llama_hidden, args.llama_ffn, True, args.llama_tokens,
                    False)


if __name__ == "__main__":
    main()
