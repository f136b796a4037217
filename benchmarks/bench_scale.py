"""7B-class shapes, one decoder block at a time: decode and prefill speed of a compacted block against the dense one.

A decoder block at the real shapes of LLaMA-2-7B (4096 / 11008, 32 heads), Llama-3-8B (4096 / 14336, grouped-query
attention with 8 KV heads) or Qwen2.5-7B (3584 / 18944, 28 heads, 4 KV heads, q/k/v biases) is built from its
config with random weights (transformers' own ``LlamaDecoderLayer`` / ``Qwen2DecoderLayer``, rotary embeddings, SDPA
attention). Its seven projections are then replaced by LoSparse layers at each kept fraction, half of it low rank
and half rows of S (``r (in + out) = f/2 in out``, ``f/2 out`` kept rows, random), compacted with ``utils.prune``
(the cost model picks each layer's form), and timed against the dense block in the same run, call by call:

- projections: the seven projections alone on one token (a decode step's matrix-vector products: what LoSparse
  compresses; bound ``1 / kept``), also against the dense weights multiplied by ``torch.mv`` (``dense_mv_ms``: on
  CPUs where ``nn.Linear``'s one-column GEMM is slower than a matrix-vector product, the part of the gain that is
  not LoSparse's);
- decode: batch 1, one new token on a KV cache of ``--context`` tokens (cropped back after every step);
- prefill: ``--prefill`` tokens at once (causal).

The rotary cos/sin are computed before the timed calls (a model computes them once per step for all its blocks).

Beside each time ratio: the bytes ratio that bounds a memory-bound decode step (the block's weights plus the KV cache
it reads, compact over dense) and the FLOP ratio that bounds a compute-bound prefill (the projections' multiply-adds
plus attention), the aten ops of one decode call (each one a kernel on a GPU) and its GEMMs whose inner or
output size is not a multiple of 8.
Every compacted block is checked against the block holding the merged weights ``L R + S`` (relative and max abs
difference of the outputs).
bf16 where the CPU has bf16 matrix instructions (AVX512-BF16 / AMX), else fp32 (``--dtype`` overrides).

    python benchmarks/bench_scale.py --quick                          # tiny shapes, seconds (the suite runs this)
    python benchmarks/bench_scale.py --threads 2                      # the three 7B shapes (minutes on 2 cores)
    python benchmarks/bench_scale.py --shapes llama2-7b --kept 0.5 --device cuda
    python benchmarks/bench_scale.py --shapes llama2-7b --form fused             # one form forced for every layer
    python benchmarks/bench_scale.py --one-shot --threads 2          # the one-shot path per block, and projected

``--one-shot`` (``_scale_one_shot.py``): the one-shot compression of ``run_clm.py --init calibrated --one_shot
[--sequential]`` (streaming statistics, output Fisher, decompositions, error tables, allocation, build, sequential
refit) on ``--one-shot-blocks`` decoder blocks of each shape with ``--calib-tokens`` tokens, stage by stage (time,
peak memory, the bytes of every buffer it keeps), then projected to Llama-3.2-1B, LLaMA-2-7B, Llama-3-8B and
Llama-3-70B (bfloat16, 128 x 2048 calibration tokens; rows ``projection``, a markdown table on stderr).

One JSON line per measurement (``what`` = env | block | speed; with ``--one-shot``: env | one_shot_block |
one_shot_stage | one_shot_buffers | one_shot_rates | projection | projection_model).
"""
import copy
import math

import torch
from torch import nn

import _common as C
from _common import utils
from _opcount import OpCounter

# name: (family, hidden, intermediate, heads, kv heads, q/k/v bias)
SHAPES = {
    "llama2-7b": ("llama", 4096, 11008, 32, 32, False),
    "llama3-8b": ("llama", 4096, 14336, 32, 8, False),
    "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 4, True),
    "llama-1k": ("llama", 1024, 3584, 16, 4, False),  # a medium trial (--one-shot on a laptop)
    "smollm2": ("llama", 576, 1536, 9, 3, False),  # SmolLM2-135M's block (the whole model: bench_generate.py)
    "tiny": ("llama", 64, 176, 4, 2, False),
    "tiny-qwen2": ("qwen2", 56, 152, 4, 2, True),
}
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", type=C.csv(str), default=None,
                   help=f"Comma-separated, of {', '.join(SHAPES)} (default: the three 7B shapes; quick: tiny ones).")
    p.add_argument("--kept", type=C.csv(float), default=[0.9, 0.8, 0.7, 0.5],
                   help="Kept fractions of the projections' parameters (half low rank, half rows of S).")
    p.add_argument("--context", type=C.csv(int), default=None, help="KV cache lengths of decode (512,2048).")
    p.add_argument("--prefill", type=int, default=None, help="Prefill tokens (2048; quick 64; 0: none).")
    p.add_argument("--form", choices=["auto"] + list(utils.COMPACT_PATHS), default="auto",
                   help="The compacted layers' inference form: auto (the cost model's choice, as utils.prune sets it) "
                        "or one forced for every layer (compact_path).")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on CUDA and on CPUs with bf16 matrix instructions, else fp32.")
    p.add_argument("--one-shot", action="store_true",
                   help="Measure the one-shot compression path per block and project it to whole models.")
    p.add_argument("--calib-tokens", default=None,
                   help="--one-shot: calibration SEQUENCESxLENGTH (4x2048; quick 2x32; the recipe is 128x2048).")
    p.add_argument("--calib-batch", type=int, default=1, help="--one-shot: sequences per batch (1).")
    p.add_argument("--one-shot-blocks", type=int, default=2,
                   help="--one-shot: decoder blocks of the measured model (2: the statistics stream, as in a model).")
    p.add_argument("--budget", type=float, default=0.5,
                   help="--one-shot: kept fraction of the projections' parameters.")
    p.add_argument("--sequential-damp", type=float, default=0.8, help="--one-shot: the --sequential D of the refit.")
    args = p.parse_args(argv)
    C.setup(args, warmup=(2, 1), reps=(7, 2))
    if args.shapes is None:
        args.shapes = (["tiny"] if args.quick else ["llama2-7b", "llama3-8b"]) if args.one_shot else \
            (["tiny", "tiny-qwen2"] if args.quick else ["llama2-7b", "llama3-8b", "qwen2.5-7b"])
    if args.one_shot:
        import _scale_one_shot

        args.calib_tokens = _scale_one_shot.parse_tokens(args.calib_tokens or ("2x32" if args.quick else "4x2048"))
        if args.one_shot_blocks < 1 or args.calib_batch < 1 or not 0 < args.budget <= 1:
            raise SystemExit("--one-shot-blocks and --calib-batch must be >= 1, --budget in (0, 1]")
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; allowed values are {', '.join(SHAPES)}")
    if any(not 0 < f <= 1 for f in args.kept):
        raise SystemExit(f"--kept: fractions in (0, 1], got {args.kept}")
    args.context = args.context or ([16] if args.quick else [512, 2048])
    args.prefill = (64 if args.quick else 2048) if args.prefill is None else args.prefill
    return args


def cpu_has_bf16():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(args):
    if args.dtype != "auto":
        return C.DTYPES[args.dtype]
    return torch.bfloat16 if args.device.type == "cuda" or cpu_has_bf16() else torch.float32


def build_block(name, dtype, device, seed):
    """``(block, rotary, config)``: one decoder block at the shapes of ``name``, random weights."""
    family, hidden, inter, heads, kv, _ = SHAPES[name]
    if family == "qwen2":
        from transformers import Qwen2Config as Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer as Layer, Qwen2RotaryEmbedding as Rotary
    else:
        from transformers import LlamaConfig as Config
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer as Layer, LlamaRotaryEmbedding as Rotary
    config = Config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                    num_hidden_layers=1, vocab_size=128, max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        block = Layer(config, layer_idx=0).to(dtype).eval()
        rotary = Rotary(config=config)
    for m in block.modules():  # random weights at the scale of a trained model's (std 0.02)
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.02)
    return block, rotary, config


def compact_block(dense, kept, seed):
    """A copy of ``dense`` whose projections are compacted LoSparse layers: ``kept / 2`` of each matrix's parameters
    in L and R, ``kept / 2`` in rows of S."""
    block = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(seed)
    for name in PROJECTIONS:
        lin = block.get_submodule(name)
        out_f, in_f = lin.weight.shape
        r = max(1, round(kept / 2 * in_f * out_f / (in_f + out_f)))
        k = round(kept / 2 * out_f)
        w = dict(dtype=lin.weight.dtype, device=lin.weight.device)
        layer = utils.LinearLoSparse(in_f, out_f, r, has_bias=lin.bias is not None, device=w["device"],
                                     dtype=w["dtype"])
        with torch.no_grad():
            scale = (0.02 / math.sqrt(r)) ** 0.5  # L R has entries of about 0.02, like the dense weight
            layer.left.weight.copy_(torch.randn(out_f, r, generator=g) * scale)
            layer.right.weight.copy_(torch.randn(r, in_f, generator=g) * scale)
            rows = torch.randperm(out_f, generator=g)[:k]
            sparse = torch.zeros(out_f, in_f)
            sparse[rows] = torch.randn(k, in_f, generator=g) * 0.02
            layer.sparse.weight.copy_(sparse)
            if lin.bias is not None:
                layer.bias.copy_(lin.bias)
        parent, _, attr = name.rpartition(".")
        setattr(block.get_submodule(parent), attr, layer)
    utils.prune(block)
    return block


def merged_block(block):
    """The same block with each LoSparse layer merged into an ``nn.Linear`` holding ``L R + S`` (the reference)."""
    ref = copy.deepcopy(block)
    for name in PROJECTIONS:
        layer = ref.get_submodule(name)
        lin = nn.Linear(layer.in_feature, layer.out_feature, bias=layer.has_bias, device=layer.left.weight.device,
                        dtype=layer.left.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(layer.merged_weight())
            if layer.has_bias:
                lin.bias.copy_(layer.bias)
        parent, _, attr = name.rpartition(".")
        setattr(ref.get_submodule(parent), attr, lin)
    return ref


def projection_params(block):
    total = 0
    for name in PROJECTIONS:
        m = block.get_submodule(name)
        total += m.num_parameters() if isinstance(m, utils.LinearLoSparse) else sum(p.numel() for p in m.parameters())
    return total


def cache_kwarg(block):
    """The decoder layer's name of its KV cache argument (``cache`` since transformers 5.2x, ``past_key_values``
    before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(block).forward).parameters else "past_key_values"


def positions(rotary, hidden, start):
    """``(position ids, rotary cos/sin)`` of the tokens of ``hidden`` from ``start`` on: a model computes them once
    per step for all its blocks, so the timed block calls take them ready."""
    position = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None]
    return position, rotary(hidden, position)


def decode_step(block, pos, cache, hidden):
    """One token on a cache of ``context`` tokens (``pos = positions(rotary, hidden, context)``); the cache is
    cropped back to them afterwards."""
    position, emb = pos
    out = block(hidden, position_embeddings=emb, use_cache=True, position_ids=position, cache_position=position[0],
                **{cache_kwarg(block): cache})
    cache.crop(-1)
    return out[0] if isinstance(out, tuple) else out


def prefill(block, pos, hidden):
    position, emb = pos
    out = block(hidden, position_embeddings=emb, position_ids=position, cache_position=position[0])
    return out[0] if isinstance(out, tuple) else out


def projections_step(block, x, xi):
    """The seven projections of one decode step, in the block's order, on one token: q, k, v and o on a hidden-size
    input ``x``, gate and up on ``x``, down on an intermediate-size input ``xi``. Returns their outputs."""
    return [block.get_submodule(n)(xi if n == "mlp.down_proj" else x) for n in PROJECTIONS]


def filled_cache(block, rotary, config, context, dtype, device, seed):
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=config)
    hidden = (torch.randn(1, context, config.hidden_size, generator=g) * 0.5).to(device=device, dtype=dtype)
    position = torch.arange(context, device=device)[None]
    block(hidden, position_embeddings=rotary(hidden, position), use_cache=True, position_ids=position,
          cache_position=position[0], **{cache_kwarg(block): cache})
    return cache


def kv_bytes(config, context, elt):
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * context * config.num_key_value_heads * head_dim * elt


def differences(diff, ref):
    """How far the compacted block's output is from the merged-weights block's: relative (Frobenius) and max abs."""
    return {"rel_diff": float(diff.norm() / ref.norm().clamp_min(1e-30)), "max_abs_diff": float(diff.abs().max())}


def ops_of(fn):
    with OpCounter() as c:
        fn()
    # a decode step multiplies one token: that size is 1 by nature (as the rows of x, or the columns of x^T in the
    # transposed form); the weights' sizes are what must be multiples of 8
    return {"aten_ops": c.total, "kernels": c.kernels, "gemms": len(c.gemms),
            "gemms_not_multiple_of_8": sum(1 for g in c.gemms if any(d % 8 for d in g[1:4] if d != 1))}


def measure(args, name, dtype):
    device = args.device
    dense, rotary, config = build_block(name, dtype, device, args.seed)
    elt = torch.finfo(dtype).bits // 8
    dense_params = projection_params(dense)
    C.emit("block", shape=name, hidden=config.hidden_size, intermediate=config.intermediate_size,
           heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, dtype=str(dtype).split(".")[-1],
           projection_params=dense_params, projection_bytes=dense_params * elt)
    g = torch.Generator().manual_seed(args.seed + 1)
    token = (torch.randn(1, 1, config.hidden_size, generator=g) * 0.5).to(device=device, dtype=dtype)
    prompt = (torch.randn(1, max(args.prefill, 1), config.hidden_size, generator=g) * 0.5).to(device=device,
                                                                                             dtype=dtype)
    for kept in args.kept:
        block = compact_block(dense, kept, args.seed + 2)
        if args.form != "auto":
            for n in PROJECTIONS:
                block.get_submodule(n).compact_path = args.form
        ref = merged_block(block)
        params = projection_params(block)
        paths = {}
        with torch.inference_mode():
            # the seven projections alone, one token (what a decode step reads: their weights, bound 1 / kept)
            xi = (torch.randn(1, config.intermediate_size, generator=g) * 0.5).to(device=device, dtype=dtype)
            fns = {v: (lambda b=b: projections_step(b, token[0], xi)) for v, b in (("dense", dense), ("compact", block))}
            # the dense weights through torch.mv (the compacted forms' single-token products): the gain the GEMV
            # path alone gives, apart from the bytes LoSparse saves (nn.Linear takes a GEMM with one column)
            weights = [(dense.get_submodule(n).weight, dense.get_submodule(n).bias, n == "mlp.down_proj")
                       for n in PROJECTIONS]
            fns["dense_mv"] = lambda: [torch.mv(w, xi[0] if d else token[0, 0]) if b is None else
                                       torch.addmv(b, w, xi[0] if d else token[0, 0]) for w, b, d in weights]
            diff = [(c.float() - r.float()) for c, r in zip(fns["compact"](), projections_step(ref, token[0], xi))]
            t = C.time_variants(fns, device, args.warmup, args.reps)
            ratio = params / dense_params
            C.emit("speed", shape=name, phase="projections", kept=kept, dtype=str(dtype).split(".")[-1],
                   dense_ms=t["dense"]["ms"], compact_ms=t["compact"]["ms"],
                   speedup=round(t["dense"]["ms"] / t["compact"]["ms"], 3), bytes_ratio=round(ratio, 4),
                   bound=round(1 / ratio, 3), of_bound=round(t["dense"]["ms"] / t["compact"]["ms"] * ratio, 3),
                   kept_params=round(ratio, 4), dense_mv_ms=t["dense_mv"]["ms"],
                   speedup_vs_dense_mv=round(t["dense_mv"]["ms"] / t["compact"]["ms"], 3),
                   **differences(torch.cat([d.flatten() for d in diff]),
                                 torch.cat([r.float().flatten() for r in projections_step(ref, token[0], xi)])),
                   paths=sorted({block.get_submodule(n).last_path for n in PROJECTIONS}))
            for context in args.context:
                caches = {v: filled_cache(b, rotary, config, context, dtype, device, args.seed + 3)
                          for v, b in (("dense", dense), ("compact", block), ("ref", ref))}
                pos = positions(rotary, token, context)
                fns = {v: (lambda b=b, c=caches[v]: decode_step(b, pos, c, token))
                       for v, b in (("dense", dense), ("compact", block))}
                ref_out = decode_step(ref, pos, caches["ref"], token).float()
                diff = fns["compact"]().float() - ref_out
                t = C.time_variants(fns, device, args.warmup, args.reps)
                kv = kv_bytes(config, context, elt)
                ratio = (params * elt + kv) / (dense_params * elt + kv)
                paths.update({n: block.get_submodule(n).last_path for n in PROJECTIONS})
                C.emit("speed", shape=name, phase="decode", context=context, kept=kept, dtype=str(dtype).split(".")[-1],
                       dense_ms=t["dense"]["ms"], compact_ms=t["compact"]["ms"],
                       speedup=round(t["dense"]["ms"] / t["compact"]["ms"], 3), bytes_ratio=round(ratio, 4),
                       bound=round(1 / ratio, 3), of_bound=round(t["dense"]["ms"] / t["compact"]["ms"] * ratio, 3),
                       kept_params=round(params / dense_params, 4), **differences(diff, ref_out),
                       paths=sorted(set(paths.values())), dense_ops=ops_of(fns["dense"]),
                       compact_ops=ops_of(fns["compact"]))
                del caches, fns
            if args.prefill:
                pos = positions(rotary, prompt, 0)
                fns = {"dense": lambda: prefill(dense, pos, prompt), "compact": lambda: prefill(block, pos, prompt)}
                ref_out = prefill(ref, pos, prompt).float()
                diff = fns["compact"]().float() - ref_out
                t = C.time_variants(fns, device, max(1, args.warmup // 2), max(1, args.reps // 2))
                n, hd = args.prefill, config.hidden_size
                attn = 2 * n * n * hd  # QK^T and PV, causal halves of two n x n x hidden products
                flops = (2 * n * params + attn) / (2 * n * dense_params + attn)
                paths = {n_: block.get_submodule(n_).last_path for n_ in PROJECTIONS}
                C.emit("speed", shape=name, phase="prefill", tokens=n, kept=kept, dtype=str(dtype).split(".")[-1],
                       dense_ms=t["dense"]["ms"], compact_ms=t["compact"]["ms"],
                       speedup=round(t["dense"]["ms"] / t["compact"]["ms"], 3), flop_ratio=round(flops, 4),
                       bound=round(1 / flops, 3), kept_params=round(params / dense_params, 4),
                       **differences(diff, ref_out), paths=sorted(set(paths.values())))
        block = ref = None  # freed before the next fraction's copy


def main(argv=None):
    args = parse_args(argv)
    C.emit_env(args, "bench_scale.py")
    if args.one_shot:
        import _scale_one_shot

        return _scale_one_shot.main(args, SHAPES, pick_dtype)
    for name in args.shapes:
        measure(args, name, pick_dtype(args))


if __name__ == "__main__":
    main()
