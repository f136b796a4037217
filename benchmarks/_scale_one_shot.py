"""``bench_scale.py --one-shot``: the one-shot compression path of ``run_clm.py --init calibrated --one_shot
[--sequential D] --calibration_blocks_per_pass 1`` on decoder blocks of a 7B-class shape, stage by stage, and its
projection to whole models (Llama-3.2-1B, LLaMA-2-7B, Llama-3-8B, Llama-3-70B).

The measured model is a ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` of ``--one-shot-blocks`` decoder blocks at the
full hidden / intermediate sizes with a vocabulary of 128 (the output Fisher needs a next-token loss; the real
vocabulary's logits are added by formula), random weights (std 0.02) and random token ids. It runs the library's own
calls in run_clm.py's order: ``utils.InputCovariances`` (streaming, one block per pass), ``utils.collect_output_fisher``
and ``utils.one_shot_allocate`` without and then with ``sequential=``. Each stage is timed by wrapping the public
functions the pipeline calls (``calibration.collect_input_covariance``, ``one_shot.fisher_svds``,
``one_shot.allocation_table``, ``one_shot.allocate``, ``one_shot.run_batch``) for the duration of the run; the time
of a stage is the time spent in it and not in a stage nested in it. Peak host memory of each stage: the process's
``VmHWM``, reset at every stage boundary (``/proc/self/clear_refs``, after ``malloc_trim``); where that reset is
refused, the ``VmRSS`` at the boundaries (``memory`` in the env row says which). On CUDA also
``torch.cuda.max_memory_allocated`` per stage.
"""
import contextlib
import copy
import ctypes
import math
import sys
import time

import torch
from torch import nn

import _common as C
from _common import utils
import losparse.calibration as calibration
import losparse.one_shot as one_shot

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK_NAME = ["lm_head", "embed_tokens", "norm"]
VOCAB = 128  # of the measured model
RECIPE_TOKENS, RECIPE_BATCH = 128 * 2048, 2048  # calibration of the projection: 128 blocks of 2048, batch 1
GIB = 2 ** 30
GPU_LIMIT, HOST_LIMIT = 24 * GIB, 32 * GIB
# name: (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings, measured shape projected from)
MODELS = {
    "Llama-3.2-1B": (2048, 8192, 16, 32, 8, 128256, True, "llama3-8b"),
    "LLaMA-2-7B": (4096, 11008, 32, 32, 32, 32000, False, "llama2-7b"),
    "Llama-3-8B": (4096, 14336, 32, 32, 8, 128256, False, "llama3-8b"),
    "Llama-3-70B": (8192, 28672, 80, 64, 8, 128256, False, "llama3-8b"),
}
STAGES = ("forward", "statistics", "output_fisher", "decompositions", "tables", "allocate", "build", "sequential_refit",
          "sequential_decompositions")


def block_costs(h, i, heads, kv):
    """The sizes the stages scale with, for one decoder block (q, k, v, o, gate, up, down; LLaMA layout)."""
    kvd = kv * h // heads
    layers = {"q_proj": (h, h), "k_proj": (kvd, h), "v_proj": (kvd, h), "o_proj": (h, h), "gate_proj": (i, h),
              "up_proj": (i, h), "down_proj": (h, i)}  # (out, in)
    distinct = [h, h, h, i]  # the inputs of q/k/v, o, gate/up, down
    return {
        "params": sum(o * n for o, n in layers.values()) + 2 * h,
        "svd": sum(min(o, n) ** 2 * max(o, n) for o, n in layers.values()) + sum(n ** 3 for n in distinct),
        "build": sum(min(o, n) ** 2 * max(o, n) for o, n in layers.values()),
        "table": sum(o * min(o, n) for o, n in layers.values()),
        "table_entries": sum((math.ceil(min(o, n) / 8) + 1) * (o + 1) for o, n in layers.values()),
        "acc": sum(n * n for n in distinct), "act": 4 * h + 3 * i, "outs": sum(o for o, _ in layers.values()),
        "factors": sum(o * min(o, n) + min(o, n) + min(o, n) * n for o, n in layers.values()),
        "max_factors": max(o * min(o, n) + min(o, n) + min(o, n) * n for o, n in layers.values()),
        "max_in": max(distinct), "max_wk": max(o * n for o, n in layers.values()),
        "max_uq": max(o * min(o, n) for o, n in layers.values()), "max_q": max(min(o, n) for o, n in layers.values()),
        "max_table": max((math.ceil(min(o, n) / 8) + 1) * (o + 1) for o, n in layers.values()),
    }


# ------------------------------------------------------------------------------------------ measuring
class Memory:
    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None
        self.mode = "VmHWM reset per stage" if self._clear() else "VmRSS at stage boundaries (HWM reset refused)"

    @staticmethod
    def _clear():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def reset(self):
        if self.libc is not None:
            self.libc.malloc_trim(0)
        self._clear()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self):
        rss = self.status("VmHWM") if self.mode.startswith("VmHWM") else self.status("VmRSS")
        return rss, torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def now(self):
        return self.status("VmRSS"), torch.cuda.memory_allocated(self.device) if self.cuda else None


class Stages:
    """Wall time, calls and peak memory of each stage; the innermost running stage owns the time."""

    def __init__(self, memory):
        self.mem, self.stack, self.t = memory, [], None
        self.seconds, self.calls, self.rss, self.cuda = {}, {}, {}, {}

    def _close(self):
        C.sync(self.mem.device)
        now = time.perf_counter()
        if self.stack:
            top = self.stack[-1]
            self.seconds[top] = self.seconds.get(top, 0.0) + now - self.t
            rss, cuda = self.mem.peak()
            self.rss[top] = max(self.rss.get(top, 0), rss)
            if cuda is not None:
                self.cuda[top] = max(self.cuda.get(top, 0), cuda)
        self.mem.reset()
        self.t = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, label):
        self._close()
        self.stack.append(label)
        self.calls[label] = self.calls.get(label, 0) + 1
        try:
            yield
        finally:
            self._close()
            self.stack.pop()

    def relabel(self, label):
        """The running outer stage goes on as ``label`` (one_shot_allocate: pass 1, then the build, then the refit)."""
        self._close()
        self.stack[-1] = label
        self.calls[label] = self.calls.get(label, 0) + 1

    def top(self):
        return self.stack[-1] if self.stack else None


@contextlib.contextmanager
def instrumented(stages, rec):
    """Wrap the public functions the one-shot path calls, for the duration (restored after)."""
    orig = {"cov": calibration.collect_input_covariance, "svd": one_shot.fisher_svds,
            "table": one_shot.allocation_table, "alloc": one_shot.allocate, "run": one_shot.run_batch}

    def cov(model, batches, *a, **k):
        with stages.stage("statistics"):
            t0 = time.perf_counter()
            out = orig["cov"](model, batches, *a, **k)
            C.sync(stages.mem.device)
            seconds = time.perf_counter() - t0
        distinct = {id(c): c for c in out.values()}
        last = calibration.block_key(list(out)[-1])
        rec["statistics_calls"].append({"seconds": seconds, "blocks_run": int(last.rpartition(".")[2]) + 1,
                                        "distinct_in": sorted(c.shape[0] for c in distinct.values()),
                                        "bytes": sum(c.numel() * c.element_size() for c in distinct.values())})
        return out

    def svd(targets, input_cov, output_fisher, **kw):
        label = "sequential_decompositions" if stages.top() == "sequential_refit" else "decompositions"
        with stages.stage(label):
            out = orig["svd"](targets, input_cov, output_fisher, **kw)
        if label == "decompositions":
            for n, d in out.items():
                rec["factors"][n] = {k: d[k].numel() * d[k].element_size() for k in ("U", "S", "Vh")}
            rec["k_inv"][tuple(out)] = sum(t.numel() * t.element_size() for t in
                                           {id(d["K_inv"]): d["K_inv"] for d in out.values()
                                            if d["K_inv"] is not None}.values())
        return out

    def table(U, S, ranks, *a, **k):
        E, res = orig["table"](U, S, ranks, *a, **k)
        if stages.top() == "tables":  # pass 1: the tables one_shot_allocate keeps until the allocation
            rec["tables"].append({"out": U.shape[0], "q": S.numel(), "shape": list(E.shape),
                                  "dtype": str(E.dtype).split(".")[-1], "bytes": E.numel() * E.element_size()})
        return E, res

    def alloc(tables, budget, *a, **k):
        with stages.stage("allocate"):
            out = orig["alloc"](tables, budget, *a, **k)
        stages.relabel("build")
        return out

    def run(model, batch):  # only the sequential refit calls one_shot.run_batch: its capture pass
        if stages.top() == "build":
            stages.relabel("sequential_refit")
        rec["capturing"] = True
        try:
            return orig["run"](model, batch)
        finally:
            rec["capturing"] = False

    patches = [(calibration, "collect_input_covariance", cov), (one_shot, "fisher_svds", svd),
               (one_shot, "allocation_table", table), (one_shot, "allocate", alloc), (one_shot, "run_batch", run)]
    for mod, name, fn in patches:
        setattr(mod, name, fn)
    try:
        yield
    finally:
        for mod, name, _ in patches:
            setattr(mod, name, orig[{"collect_input_covariance": "cov", "fisher_svds": "svd",
                                     "allocation_table": "table", "allocate": "alloc", "run_batch": "run"}[name]])


def new_record():
    return {"statistics_calls": [], "factors": {}, "k_inv": {}, "tables": [], "capturing": False,
            "hidden_bytes": 0, "hidden_dtype": None}


def build_model(family, hidden, inter, heads, kv, blocks, dtype, device, seed):
    if family == "qwen2":
        from transformers import Qwen2Config as Config, Qwen2ForCausalLM as Model
    else:
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model
    config = Config(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                    num_hidden_layers=blocks, vocab_size=VOCAB, max_position_embeddings=8192,
                    tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = Model(config).to(dtype).eval()
    with torch.no_grad():
        for m in model.modules():  # random weights at the scale of a trained model's (std 0.02)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.normal_(m.bias, std=0.02)
    return model


@contextlib.contextmanager
def saved_activations(model, out):
    """Counts the bytes autograd saves in each forward pass (parameters left out): ``out["max"]``, over passes."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = set()
    state = {"bytes": 0}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            state["bytes"] += st.nbytes()
            out["max"] = max(out.get("max", 0), state["bytes"])
        return t

    def pre(mod, args):
        seen.clear()
        state["bytes"] = 0
    handle = model.register_forward_pre_hook(pre)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        handle.remove()


def stage_rows(stages, base):
    rows = {}
    for s in STAGES:
        if s not in stages.seconds:
            continue
        r = {"seconds": round(stages.seconds[s], 4), "calls": stages.calls[s], "peak_rss_bytes": stages.rss[s],
             "peak_rss_over_start_bytes": max(0, stages.rss[s] - base[0])}
        if s in stages.cuda:
            r.update(cuda_peak_bytes=stages.cuda[s], cuda_peak_over_start_bytes=max(0, stages.cuda[s] - base[1]))
        rows[s] = r
    return rows


def measure(args, name, shape, dtype):
    """Runs the pipeline on ``--one-shot-blocks`` blocks of ``shape``; emits its rows and returns the figures the
    projection uses."""
    family, h, inter, heads, kv, _ = shape
    device, blocks = args.device, args.one_shot_blocks
    n_seq, length = args.calib_tokens
    model = build_model(family, h, inter, heads, kv, blocks, dtype, device, args.seed)
    elt = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, VOCAB, (n_seq, length), generator=g).to(device)
    batches = [ids[s:s + args.calib_batch] for s in range(0, n_seq, args.calib_batch)]
    tokens = n_seq * length
    dense = copy.deepcopy(model)  # the sequential run starts from the same dense model
    costs = block_costs(h, inter, heads, kv)
    C.emit("one_shot_block", shape=name, hidden=h, intermediate=inter, heads=heads, kv_heads=kv,
           dtype=str(dtype).split(".")[-1], blocks=blocks, calibration_tokens=tokens, sequences=n_seq,
           length=length, batch=args.calib_batch, budget=args.budget, block_params=costs["params"],
           model="LlamaForCausalLM" if family == "llama" else "Qwen2ForCausalLM", vocab=VOCAB)
    mem = Memory(device)
    stages, rec, saved = Stages(mem), new_record(), {}
    mem.reset()
    base = mem.now()
    with torch.no_grad(), stages.stage("forward"):  # reference: the plain forward passes (no hooks)
        for b in batches:
            model(b)
    fwd_seconds = stages.seconds["forward"]
    stats = utils.InputCovariances(model, batches, PROJ, BLOCK_NAME, blocks_per_pass=1)
    with saved_activations(model, saved), stages.stage("output_fisher"):
        fisher = utils.collect_output_fisher(model, batches, PROJ, BLOCK_NAME)
    with instrumented(stages, rec), stages.stage("tables"):
        info = utils.one_shot_allocate(model, stats, fisher, args.budget, PROJ, BLOCK_NAME)
    plain = stage_rows(stages, base)
    del model, stats
    stages2, rec2 = Stages(mem), new_record()
    stats2 = utils.InputCovariances(dense, batches, PROJ, BLOCK_NAME, blocks_per_pass=1)

    def count_hidden(mod, a, kw):  # the hidden states the refit captures entering its first block
        if rec2["capturing"]:
            hs = a[0] if a else kw["hidden_states"]
            rec2["hidden_bytes"] += hs.numel() * hs.element_size()
            rec2["hidden_dtype"] = str(hs.dtype).split(".")[-1]
    handle = dense.model.layers[0].register_forward_pre_hook(count_hidden, with_kwargs=True)
    mem.reset()
    base2 = mem.now()
    try:
        with instrumented(stages2, rec2), stages2.stage("tables"):
            info2 = utils.one_shot_allocate(dense, stats2, fisher, args.budget, PROJ, BLOCK_NAME, sequential=batches,
                                            sequential_damp=args.sequential_damp)
    finally:
        handle.remove()
    seq = stage_rows(stages2, base2)
    for run, rows in (("plain", plain), ("sequential", seq)):
        for s, r in rows.items():
            C.emit("one_shot_stage", shape=name, run=run, stage=s, **r)
    fisher_bytes = sum(f.numel() * f.element_size() for f in fisher.values())
    covs = rec["statistics_calls"]
    buffers = {
        "covariance_bytes_per_block": covs[0]["bytes"], "covariance_inputs": covs[0]["distinct_in"],
        "covariance_formula": "8 x sum(in^2) over the distinct inputs (q/k/v, o, gate/up, down)",
        "fisher_bytes": fisher_bytes, "fisher_formula": "8 x sum(out) per layer",
        "svd_factor_bytes": {k: sum(f[k] for f in rec["factors"].values()) for k in ("U", "S", "Vh")},
        "k_inv_bytes_per_block": max(rec["k_inv"].values()), "svd_formula": "4 x (out q + q + q in) per layer, q = "
        "min(out, in); K^-1: 8 x in^2 per distinct input",
        "table_bytes": sum(t["bytes"] for t in rec["tables"]), "table_dtype": rec["tables"][0]["dtype"],
        "table_shapes": [t["shape"] for t in rec["tables"]],
        "table_formula": "4 x (ceil(q/8) + 1) x (out + 1) per layer (float32; float64 before: x 8)",
        "hidden_bytes": 2 * rec2["hidden_bytes"], "hidden_dtype": rec2["hidden_dtype"],
        "hidden_formula": "2 x tokens x hidden x element size (original and compressed)",
        "fisher_saved_activation_bytes_per_batch": saved.get("max", 0),
    }
    C.emit("one_shot_buffers", shape=name, blocks=blocks, **buffers)
    # per block (and per token) rates, the projection's inputs
    fwd_pt = fwd_seconds / (blocks * tokens)
    acc = [max(0.0, c["seconds"] - c["blocks_run"] * fwd_pt * tokens) / tokens for c in covs]
    build = plain.get("build", {}).get("seconds", 0.0)
    rates = {
        "forward_s_per_block_token": fwd_pt, "statistics_acc_s_per_block_token": sum(acc) / len(acc),
        "fisher_s_per_block_token": plain["output_fisher"]["seconds"] / (blocks * tokens),
        "decomposition_s_per_block_pass": plain["decompositions"]["seconds"] / plain["decompositions"]["calls"],
        "tables_s_per_block": plain["tables"]["seconds"] / blocks,
        "allocate_s_per_table_entry": plain["allocate"]["seconds"] / sum(
            math.prod(t["shape"]) for t in rec["tables"]),
        "build_s_per_block": build / blocks,
        "sequential_decomposition_s_per_block": seq.get("sequential_decompositions", {}).get("seconds", 0) / blocks,
        "sequential_s_per_block_token": max(0.0, seq["sequential_refit"]["seconds"] - build) / (blocks * tokens),
        "saved_activation_bytes_per_block_token": saved.get("max", 0) / (blocks * length * args.calib_batch),
    }
    C.emit("one_shot_rates", shape=name, **{k: float(f"{v:.6g}") for k, v in rates.items()},
           stored=info["stored"], budget=info["budget"], weighted_error=info["weighted_error"],
           weighted_error_sequential=info2.get("weighted_error_sequential"))
    over = {}  # each stage's peak over the run's start (CUDA where measured there, else host RSS)
    for rows in (plain, seq):
        for s_, r_ in rows.items():
            over[s_] = max(over.get(s_, 0), r_.get("cuda_peak_over_start_bytes", r_["peak_rss_over_start_bytes"]))
    # what one_shot_allocate keeps in host memory on a GPU (fisher_svds(store="cpu")): a block's SVD factors and
    # K^-1; measured on the host they are part of the peaks above, so the GPU projection takes them out
    stored = 0 if device.type == "cuda" else (sum(buffers["svd_factor_bytes"].values()) / blocks
                                              + buffers["k_inv_bytes_per_block"])
    return {"shape": shape, "costs": costs, "rates": rates, "elt": elt, "over": over,
            "hidden_bytes": buffers["hidden_bytes"], "stored_bytes_per_block": stored}


# ------------------------------------------------------------------------------------------ projection
def project_model(name, spec, src, src_name):
    """``{stage: {gpu, host, seconds, *_formula}}`` for one whole model from the measured block ``src``."""
    h, inter, L, heads, kv, V, tied, _ = spec
    tc, sc, r, elt = block_costs(h, inter, heads, kv), src["costs"], src["rates"], 2  # bfloat16
    T, Tb, nb = RECIPE_TOKENS, RECIPE_BATCH, RECIPE_TOKENS // RECIPE_BATCH
    params = L * tc["params"] + V * h * (1 if tied else 2) + h
    W = params * elt
    saved = r["saved_activation_bytes_per_block_token"] * tc["act"] / sc["act"] * Tb * elt / src["elt"]
    covs = 8 * tc["acc"]
    act = Tb * (3 * h + 2 * inter) * elt
    sq = tc["max_in"] ** 2 / sc["max_in"] ** 2  # the largest in x in float64 matrices set these stages' peaks
    dec_gpu = W + max(covs + 4 * tc["max_factors"] + 8 * tc["max_wk"] + 2 * 8 * tc["max_in"] ** 2,
                      (src["over"].get("decompositions", 0) - src["stored_bytes_per_block"]) * sq)
    stored_host = 4 * tc["factors"] + covs  # one block's factors and K^-1 (8 x sum(in^2), as its C)
    seq_extra = max(6 * 8 * tc["max_in"] ** 2, (src["over"].get("sequential_refit", 0) - src["hidden_bytes"]) * sq)
    tables32 = L * tc["table_entries"] * 4
    tab_tr = 4 * 8 * 1024 * tc["max_q"] + 4 * tc["max_uq"]
    p, s_svd, s_build = tc["params"] / sc["params"], tc["svd"] / sc["svd"], tc["build"] / sc["build"]
    stages = {
        "load": dict(gpu=W, host=W, seconds=0.0, gpu_formula="weights_bf16 = 2 x params",
                     host_formula="weights_bf16 (from_pretrained on the host, then .to(cuda))", time_formula="-"),
        "statistics": dict(
            gpu=W + covs + act, host=0,
            seconds=2 * T * (r["forward_s_per_block_token"] * p * L * (L + 1) / 2
                             + r["statistics_acc_s_per_block_token"] * tc["acc"] / sc["acc"] * L),
            gpu_formula="weights_bf16 + 8 x sum(in^2) [one block's C, float64] + 2048 x (3h + 2i) x 2 [one batch]",
            host_formula="-", time_formula="2 passes x tokens x (t_fwd x L(L+1)/2 + t_acc x L): each streamed group "
            "runs blocks 0..g, twice (pass 1 and pass 2); t_fwd ~ block params, t_acc ~ sum(in^2)"),
        "output_fisher": dict(
            gpu=W + saved + Tb * V * 16, host=L * saved,
            seconds=T * r["fisher_s_per_block_token"] * p * (L + V * h / tc["params"]),
            gpu_formula="weights_bf16 + one block's saved activations x 2048 [unpacked in the backward pass] + "
            "2048 x vocab x 16 [logits bf16 + fp32 + log-softmax + grad]; batch 1; each layer's output gradient "
            "summed by a hook as it is produced (none held)",
            host_formula="L x saved activations x 2048 [collect_output_fisher(offload_activations=None): on CUDA "
            "the backward pass's activations wait in pinned host memory]",
            time_formula="tokens x t_fwd+bwd per block-token x (L + vocab x h / block params)"),
        "decompositions": dict(
            gpu=dec_gpu, host=stored_host, seconds=2 * L * r["decomposition_s_per_block_pass"] * s_svd,
            gpu_formula="weights_bf16 + max(8 x sum(in^2) [one block's C] + 4 x max(out q + q + q in) [one layer's "
            "U, S, Vh] + 8 x max(out x in) [W K, float64] + 2 x 8 x max(in)^2 [the widest input's damped copy of C "
            "or K, and K^-1 (solved in place of the identity)], (measured peak over start less the block's factors "
            "and K^-1, which wait on the host) x max(in)^2 ratio)",
            host_formula="4 x sum(out q + q + q in) + 8 x sum(in^2) [one block's factors and K^-1: "
            "fisher_svds(store='cpu')]",
            time_formula="2 passes x L x t_block x (sum min^2 max + sum in^3) ratio"),
        "tables": dict(
            gpu=dec_gpu, host=tables32 + tab_tr + stored_host,
            seconds=L * r["tables_s_per_block"] * tc["table"] / sc["table"],
            gpu_formula="as decompositions (pass 1 holds the block's SVDs)",
            host_formula="L x 4 x sum((ceil(q/8)+1)(out+1)) [float32 tables; float64 before: x2] + 8 x 4 x 1024 q "
            "+ 4 x out q [one table's transients] + one block's factors and K^-1",
            time_formula="L x t_block x sum(out q) ratio"),
        "allocate": dict(gpu=W, host=tables32 + 8 * tc["max_table"], seconds=r["allocate_s_per_table_entry"]
                         * L * tc["table_entries"], gpu_formula="weights_bf16",
                         host_formula="tables + one float64 table [E + lam cost]",
                         time_formula="t per table entry x L x entries per block"),
        "build": dict(gpu=dec_gpu, host=tab_tr, seconds=L * r["build_s_per_block"] * s_build,
                      gpu_formula="as decompositions (pass 2 decomposes each block again)",
                      host_formula="one layer's U on the host (tables freed)",
                      time_formula="L x t_block x sum(min^2 max) ratio [refit SVD]"),
        "sequential": dict(
            gpu=W + 2 * T * h * elt + seq_extra + act + nb * Tb * (h // heads) * 2 * elt, host=tab_tr,
            seconds=L * (r["sequential_decomposition_s_per_block"] * s_svd + r["build_s_per_block"] * s_build +
                         T * r["sequential_s_per_block_token"] * p),
            gpu_formula="weights_bf16 + 2 x tokens x h x 2 [hidden states, bf16] + max(6 x 8 x max(in)^2 [M, N, "
            "E[xx^T], K, K^-1, transient], measured peak over start less hidden states x max(in)^2 ratio) + one "
            "batch + batches x 2048 x head_dim x 2 x 2 "
            "[rotary cos/sin]",
            host_formula="as build", time_formula="L x (SVDs x svd ratio + build x build ratio + tokens x "
            "t_token x params ratio)"),
    }
    for s in stages.values():
        s["host"] = max(s["host"], 0)
    total = {"gpu": max(s["gpu"] for s in stages.values()), "host": max(s["host"] for s in stages.values()),
             "seconds": sum(s["seconds"] for k, s in stages.items() if k != "sequential"),
             "seconds_sequential": stages["sequential"]["seconds"], "params": params,
             "host_tables_float64_before": 2 * tables32, "projected_from": src_name}
    total["gpu_stage"] = max(stages, key=lambda k: stages[k]["gpu"])
    total["fits_24GiB_gpu"], total["fits_32GiB_host"] = total["gpu"] <= GPU_LIMIT, total["host"] <= HOST_LIMIT
    return stages, total


def projection(measured):
    """Rows ``projection`` (one per model and stage) and ``projection_model`` (totals); a markdown table on stderr."""
    if not measured:
        return
    out = {}
    for model, spec in MODELS.items():
        src_name = spec[7] if spec[7] in measured else next(iter(measured))
        note = ("measured at this shape" if SHAPE_OF.get(model) == src_name else
                f"projected from the measured {src_name} block by the scaling laws")
        stages, total = project_model(model, spec, measured[src_name], src_name)
        for s, v in stages.items():
            C.emit("projection", model=model, stage=s, gpu_bytes=int(v["gpu"]), host_bytes=int(v["host"]),
                   seconds=round(v["seconds"], 2), gpu_formula=v["gpu_formula"], host_formula=v["host_formula"],
                   time_formula=v["time_formula"], source=note)
        C.emit("projection_model", model=model, hidden=spec[0], intermediate=spec[1], layers=spec[2], vocab=spec[5],
               calibration_tokens=RECIPE_TOKENS, dtype="bfloat16", peak_gpu_bytes=int(total["gpu"]),
               peak_gpu_stage=total["gpu_stage"], peak_host_bytes=int(total["host"]),
               seconds=round(total["seconds"], 1),
               seconds_sequential=round(total["seconds_sequential"], 1), params=total["params"],
               host_tables_float64_before_bytes=int(total["host_tables_float64_before"]),
               fits_24GiB_gpu=total["fits_24GiB_gpu"], fits_32GiB_host=total["fits_32GiB_host"], source=note)
        out[model] = (stages, total)
    names = list(out)
    lines = ["| stage | " + " | ".join(names) + " | formula (GPU / host / time) |",
             "|---" * (len(names) + 2) + "|"]
    first = out[names[0]][0]
    for s in first:
        cells = [f"{out[m][0][s]['gpu'] / GIB:.1f} / {out[m][0][s]['host'] / GIB:.1f} GiB, "
                 f"{out[m][0][s]['seconds']:.0f} s" for m in names]
        f = first[s]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {f['gpu_formula']} / {f['host_formula']} / "
                     f"{f['time_formula']} |")
    lines.append("| **peak** | " + " | ".join(
        f"{out[m][1]['gpu'] / GIB:.1f} GiB GPU ({out[m][1]['gpu_stage']}, "
        f"{'fits' if out[m][1]['fits_24GiB_gpu'] else 'over'} "
        f"24), {out[m][1]['host'] / GIB:.1f} GiB host, {out[m][1]['seconds'] / 3600:.2f} h + sequential "
        f"{out[m][1]['seconds_sequential'] / 3600:.2f} h" for m in names) + " | max over stages |")
    print("\n".join(lines), file=sys.stderr)


SHAPE_OF = {"LLaMA-2-7B": "llama2-7b", "Llama-3-8B": "llama3-8b"}


def parse_tokens(text):
    n, _, length = text.lower().partition("x")
    if not n.isdigit() or not length.isdigit() or int(n) < 1 or int(length) < 2:
        raise SystemExit(f"--calib-tokens: SEQUENCESxLENGTH (e.g. 4x2048), got {text!r}")
    return int(n), int(length)


def main(args, shapes, pick_dtype):
    measured = {}
    for name in args.shapes:
        measured[name] = measure(args, name, shapes[name], pick_dtype(args))
    projection(measured)
