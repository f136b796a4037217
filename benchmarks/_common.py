"""Shared helpers of the benchmarks: flags, JSON lines, timing, base-size model configs, pruned models.

Every benchmark prints one JSON object per line and nothing else on stdout (logs go to stderr).
``utils`` is imported from the repository root, appended to ``sys.path``: set ``PYTHONPATH`` to a folder
holding another ``utils.py`` to measure that version instead (e.g. the previous commit's).
"""
import argparse
import copy
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))
import utils  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The union of the scripts' lists (run_glue.py): reaches BERT, DeBERTa-v2/v3 and BART linears.
ALLOW_NAME = ["query", "key", "value", "q_proj", "k_proj", "v_proj", "out_proj", "dense", "attention", "fc1",
              "fc2", "query_proj", "key_proj", "value_proj"]
BLOCK_NAME = ["pooler", "classifier", "LayerNorm", "embeddings"]
LOW_RANK_RATIO = 0.05  # --low_rank_parameter_ratio default; the rest of a total ratio is kept rows of S


def csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def base_parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N).")
    p.add_argument("--quick", action="store_true", help="Small settings suitable for a CPU.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU.")
    p.add_argument("--warmup", type=int, default=None, help="Untimed calls per variant.")
    p.add_argument("--reps", type=int, default=None, help="Timed calls per variant (median reported).")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args, warmup, reps):
    """Apply device/thread/timing defaults; ``warmup``/``reps`` are (full, quick) pairs."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("losparse").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup is None:
        args.warmup = warmup[1] if args.quick else warmup[0]
    if args.reps is None:
        args.reps = reps[1] if args.quick else reps[0]
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    torch.manual_seed(args.seed)
    return args


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} CPUs)"
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "cpu"


def emit(what, **fields):
    """Print one measurement as a JSON line."""
    print(json.dumps({"what": what, **fields}, default=str), flush=True)


def emit_env(args, script):
    import transformers
    emit("env", script=script, device=str(args.device), device_name=device_name(args.device),
         torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
         date=datetime.date.today().isoformat(), quick=bool(args.quick))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(fns, device, warmup, reps):
    """Time callables side by side, interleaved call by call (fair under a noisy shared machine).

    Returns ``{name: {"ms": median, "ms_min": min}}``.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: {"ms": round(1e3 * statistics.median(t), 3), "ms_min": round(1e3 * min(t), 3)}
            for name, t in times.items()}


def peak_memory(fn, device):
    """Peak CUDA memory (bytes) of one call, or None on CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return {"peak_bytes": torch.cuda.max_memory_allocated(device), "peak_over_weights_bytes":
            torch.cuda.max_memory_allocated(device) - base}


def num_params(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------------- models
def model_config(name, layers=None):
    """Base-size configs (random weights): bert-base, deberta-v3-base, bart-base. ``layers`` overrides depth."""
    from transformers import BartConfig, BertConfig, DebertaV2Config

    if name == "bert":
        cfg = BertConfig()
        if layers:
            cfg.num_hidden_layers = layers
    elif name == "deberta":
        cfg = DebertaV2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              vocab_size=128100, relative_attention=True, position_buckets=256,
                              pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False,
                              norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0)
        if layers:
            cfg.num_hidden_layers = layers
    elif name == "bart":
        cfg = BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                         encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                         decoder_ffn_dim=3072, max_position_embeddings=1024)
        if layers:
            cfg.encoder_layers = cfg.decoder_layers = layers
    else:
        raise ValueError(f"unknown model {name!r}: bert, deberta or bart")
    return cfg


def build_model(name, layers=None, head=None, seed=0, vocab_size=None):
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = model_config(name, layers)
    if vocab_size:
        cfg.vocab_size = vocab_size
    cls = AutoModelForSequenceClassification if head == "seq_cls" else AutoModel
    return cls.from_config(cfg)


def model_inputs(name, batch, seq, vocab, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (batch, seq), generator=g).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "bart":
        inputs["decoder_input_ids"] = ids
    return inputs


def keep_top_rows(model, keep_fraction):
    """Zero the rows of every S but the ``round(keep_fraction * out)`` of largest norm (a pruned stand-in)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, utils.LinearLoSparse) and m.has_sparse and not m.is_compacted:
                w = m.sparse.weight
                k = min(w.shape[0], max(0, round(keep_fraction * w.shape[0])))
                drop = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
                drop[w.float().norm(dim=1).topk(k).indices] = False
                w[drop] = 0


def losparse_variants(dense, ratios, svd="auto", allow_name=None, block_name=None, prefer="speed"):
    """``(original, {ratio: compact})``: the substituted model with dense S, and compacted copies.

    ``ratio`` is the total kept fraction of each matrix: low-rank 0.05 plus ``ratio - 0.05`` of S's rows.
    ``prefer`` goes to ``utils.prune``.
    """
    original = copy.deepcopy(dense)
    utils.substitute_layer_weights(original, allow_name or ALLOW_NAME, block_name or BLOCK_NAME,
                                   parameter_ratio=LOW_RANK_RATIO, svd=svd, log_level="IGNORE")
    compact = {}
    for ratio in ratios:
        m = copy.deepcopy(original)
        keep_top_rows(m, ratio - LOW_RANK_RATIO)
        utils.prune(m, prefer=prefer)
        compact[ratio] = m
    return original, compact
