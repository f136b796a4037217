"""Calibration statistics for the activation-aware SVD and the one-shot allocation.

``collect_input_covariance`` (``C = E[x x^T]`` of each replaced layer's inputs), ``InputCovariances`` (the same a
group of blocks at a time: streaming), ``collect_output_fisher`` (``F = E[(dLoss/dy)^2]`` of its outputs). Forward
hooks and loops over batches; the maths that uses them is in ``losparse.decomposition`` and ``losparse.one_shot``.
Padding is left out of every statistic (``token_mask``: the rows of a batch's ``attention_mask``).
"""
import contextlib
import time

import torch
import torch.nn.functional as F

from .common import logger
from .substitute import linear_targets


@torch.no_grad()
def collect_input_covariance(model, batches, allow_name=None, block_name=None, names=None, chunk=4096,
                             stop_early=False):
    """Calibration: ``C = E[x x^T]`` of the inputs of the layers STEP 1 would replace, over ``batches``.

    ``batches``: an iterable of dicts (``model(**batch)``) or tensors (``model(batch)``), e.g. a few blocks
    of text; labels are dropped. Every token row counts once, padding never: where a dict batch holds an
    ``attention_mask`` of the inputs' leading shape (batch, seq), only its nonzero positions are accumulated and
    counted (:func:`token_mask`), so right-padded texts give the statistics of the texts alone; inputs of
    another shape (an encoder-decoder's decoder) count every row. The per-chunk products ``x^T x`` (at most
    ``chunk`` rows) are taken in float32 and summed in float64. Layers called in a row on the same input tensor
    (q/k/v, gate/up) share one accumulation and get the same ``C`` object.
    ``names`` restricts the statistics to those layers (to bound memory on large models: one pass per group
    of decoder blocks, each ``C`` used by :func:`substitute_layer_weights` and dropped; :class:`InputCovariances`
    does that). ``stop_early``: end each forward pass once every layer in ``names`` has seen its input (the rest
    of the model is not run; for a group of early blocks that saves most of the pass).

    :return: ``{qualified layer name: C}`` (float64, on the layers' device); logs tokens, memory and time.
    """

    targets = _calibration_targets(model, allow_name, block_name, names, "collect_input_covariance")
    sums, counts, owner, last, seen = {}, {}, {}, {"x": None, "name": None}, set()
    mask, keeps = None, {}  # the batch's attention mask; its token rows to keep per (input shape, device)

    def hook(name):
        def pre(mod, args):
            accumulate(name, args[0])
            seen.add(name)
            if stop_early and len(seen) == len(targets):
                raise CalibrationDone
        return pre

    def accumulate(name, x):
        if x is last["x"]:  # the same tensor as the previous layer: share its accumulation
            if owner.setdefault(name, owner[last["name"]]) != owner[last["name"]]:
                raise RuntimeError(f"collect_input_covariance: {name} changed its input sharing between batches")
            return
        if owner.setdefault(name, name) != name:
            raise RuntimeError(f"collect_input_covariance: {name} changed its input sharing between batches")
        last["x"], last["name"] = x, name
        x2 = _unpadded(x.detach().reshape(-1, x.shape[-1]), x.shape[:-1], mask, keeps)
        acc = sums.get(name)
        if acc is None:
            acc = sums[name] = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64, device=x2.device)
            counts[name] = 0
        for i in range(0, x2.shape[0], chunk):
            c = x2[i:i + chunk].float()
            acc += (c.mT @ c).double()
        counts[name] += x2.shape[0]

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets]
    was_training = model.training
    model.eval()
    start, batches_seen = time.perf_counter(), 0
    try:
        for batch in batches:
            last["x"] = last["name"] = None
            seen.clear()
            mask, keeps = attention_mask(batch), {}
            try:
                run_batch(model, batch)
            except CalibrationDone:
                pass
            batches_seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        last["x"] = None
    missing = [n for n, _ in targets if n not in owner]
    if missing:
        raise RuntimeError(f"collect_input_covariance: {len(missing)} layers were never called, e.g. {missing[:3]}")
    for n in sums:
        sums[n] /= max(counts[n], 1)
    covs = {n: sums[owner[n]] for n, _ in targets}
    nbytes = sum(c.numel() * c.element_size() for c in sums.values())
    logger.info("LoSparse calibration: %d batches, %d tokens, %d layers (%d distinct inputs), statistics %.1f MiB, "
                "%.1f s", batches_seen, max(counts.values()), len(covs), len(sums), nbytes / 2 ** 20,
                time.perf_counter() - start)
    return covs


def attention_mask(batch):
    """The ``attention_mask`` of a dict batch, else None (a tensor of input ids has no padding)."""
    return batch.get("attention_mask") if isinstance(batch, dict) else None


def token_mask(mask, shape):
    """The token rows to count in the statistics of inputs of leading shape ``shape`` (``x.shape[:-1]``), flattened
    to match ``x.reshape(-1, x.shape[-1])``: ``mask != 0`` where ``mask`` (a batch's attention mask, or None) has
    that shape, so that padding adds nothing; None (every row) when it keeps every position (no copy needed) or has
    another shape (e.g. the decoder of an encoder-decoder, whose inputs have another length than the mask's)."""
    if mask is None or tuple(mask.shape) != tuple(shape):
        return None
    keep = mask.reshape(-1) != 0
    return None if bool(keep.all()) else keep


def _unpadded(rows, shape, mask, keeps):
    """``rows`` (inputs of leading shape ``shape``, flattened) less the padding of ``mask`` (:func:`token_mask`),
    the same tensor when nothing is padded. ``keeps``: the batch's masks by shape and device, so each is computed
    once per batch and not once per layer."""
    key = (tuple(shape), rows.device)
    if key not in keeps:
        keep = token_mask(mask, shape)
        keeps[key] = None if keep is None else keep.to(rows.device)
    return rows if keeps[key] is None else rows[keeps[key]]


class CalibrationDone(Exception):
    """Raised by :func:`collect_input_covariance` (``stop_early``) to end a forward pass."""


def block_key(name):
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.3``: the name up to its first numeric part (the block)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return name


class InputCovariances:
    """Streaming calibration: the statistics of :func:`collect_input_covariance` a group of blocks at a time.

    Holding ``C`` for every layer at once takes ``sum in^2`` float64 entries per distinct input: about 1.4 GB
    per LLaMA-7B decoder block, 44 GB for the model. ``InputCovariances(model, batches, allow_name, block_name,
    blocks_per_pass=1)`` holds none: ``stats.groups`` lists the layer names of each pass (``blocks_per_pass``
    consecutive blocks, a block being the name up to its first numeric part, ``model.layers.3``), and
    ``stats(names)`` runs the batches through the model once (stopped after the last of those layers) and returns
    ``{name: C}`` for them. :func:`substitute_layer_weights` (``input_cov=stats``) and :func:`one_shot_allocate`
    take it in place of the dict: they ask for one group at a time, the last group first, so that the layers they
    have replaced are downstream of the ones being measured and every ``C`` is that of the original model (the
    result equals the one of the dict). Peak memory: one group's statistics and SVDs. ``batches`` must be a
    re-iterable sequence (a list), run once per group and twice per group by :func:`one_shot_allocate`.
    """

    def __init__(self, model, batches, allow_name=None, block_name=None, blocks_per_pass=1):
        if not isinstance(blocks_per_pass, int) or blocks_per_pass < 1:
            raise ValueError(f"blocks_per_pass must be an integer >= 1, got {blocks_per_pass!r}")
        if iter(batches) is batches:
            raise TypeError("InputCovariances: batches must be a re-iterable sequence (e.g. a list), not an iterator: "
                            "it is run once per group of layers")
        targets = _calibration_targets(model, allow_name, block_name, None, "InputCovariances")
        self.model, self.batches, self.allow_name, self.block_name = model, batches, allow_name, block_name
        blocks = []
        for n, _ in targets:
            if not blocks or block_key(n) != blocks[-1][0]:
                blocks.append((block_key(n), []))
            blocks[-1][1].append(n)
        self.groups = [sum((names for _, names in blocks[i:i + blocks_per_pass]), [])
                       for i in range(0, len(blocks), blocks_per_pass)]
        self.names = [n for n, _ in targets]

    def __call__(self, names):
        logger.info("LoSparse streaming calibration: %d layers, from %s", len(names), names[0])
        return collect_input_covariance(self.model, self.batches, self.allow_name, self.block_name, names=names,
                                        stop_early=True)


def _calibration_targets(model, allow_name, block_name, names, what):
    targets = linear_targets(model, allow_name, block_name)
    if names is not None:
        unknown = sorted(set(names) - {n for n, _ in targets})
        if unknown:
            raise ValueError(f"names: {unknown[:3]} are not layers to replace (allow_name={allow_name})")
        targets = [(n, m) for n, m in targets if n in set(names)]
    if not targets:
        raise ValueError(f"{what}: no nn.Linear matches allow_name={allow_name}")
    return targets


def collect_output_fisher(model, batches, allow_name=None, block_name=None, names=None, offload_activations=None):
    """Calibration: ``F = E[(dLoss/dy)^2]`` per output feature of the layers STEP 1 would replace (diagonal Fisher).

    ``Loss`` is the next-token cross-entropy of a causal LM, summed over the tokens of a batch (labels: the
    batch's ``labels`` if it is a dict holding them, else its ``input_ids``; ``-100`` ignored, and so are the
    positions where the batch's ``attention_mask`` of the labels' shape is 0: padding is never a target), so
    ``dLoss/dy`` is each token's own gradient; ``F`` is the mean of its square over the token rows of ``y``,
    padding left out as in :func:`collect_input_covariance` (its gradient is 0 and would dilute the mean). One
    backward pass per batch, from the loss to the input embeddings' output (``torch.autograd.grad``: no parameter
    ``.grad`` is touched, no weight gradient computed), each layer's output gradient folded into its sum by a tensor
    hook as the pass produces it, so no output or gradient is held to the end of the pass. With
    ``C`` from :func:`collect_input_covariance`, ``1/2 sum_i F_i E[((W - W')_i x)^2]`` is the second-order
    loss increase of replacing ``W`` by ``W'``, comparable across layers (:func:`one_shot_allocate`).

    ``offload_activations``: keep the activations the backward pass needs in host memory
    (``torch.autograd.graph.save_on_cpu``, pinned) instead of on the device, a whole model's worth for a sequence
    (about 11 GB for Llama-3-8B at 2,048 tokens in bf16, more than the weights leave of a 24 GB GPU); default (None):
    on when the layers are on a CUDA device.

    :return: ``{qualified layer name: F}`` (float64 vectors of ``out_features``); logs tokens and time.
    """
    targets = _calibration_targets(model, allow_name, block_name, names, "collect_output_fisher")
    if offload_activations is None:
        offload_activations = targets[0][1].weight.is_cuda
    sums, counts, outs, state = {}, {}, [], {"mask": None, "keeps": {}, "rows": {}}
    # The backward pass starts at the input embeddings' output (a leaf that requires grad): every layer's output is
    # then in the graph, no weight gradient is computed, and each output's gradient is folded into the sums by a
    # tensor hook as soon as the backward pass produces it (nothing is held per layer). A model without input
    # embeddings: the layers' weights require grad for the pass and the outputs' gradients come back together.
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    root = {}

    def add(name, g, shape, mask, keeps):
        g2 = _unpadded(g.detach().reshape(-1, g.shape[-1]), shape, mask, keeps).double()
        sums[name] += (g2 * g2).sum(0)

    def hook(name):
        def fwd(mod, args, out):
            if not out.requires_grad:
                return
            shape, mask, keeps = out.shape[:-1], state["mask"], state["keeps"]
            if name not in sums:
                sums[name], counts[name] = torch.zeros(out.shape[-1], dtype=torch.float64, device=out.device), 0
            key = (tuple(shape), out.device)  # the rows this output adds (padding left out), gradient or not:
            if key not in state["rows"]:  # once per batch and shape (no device sync per layer)
                keep = token_mask(mask, shape)
                state["rows"][key] = out.numel() // out.shape[-1] if keep is None else int(keep.sum())
            counts[name] += state["rows"][key]
            if emb is not None:
                out.register_hook(lambda g: add(name, g, shape, mask, keeps))
            else:
                outs.append((name, out, shape))
        return fwd

    def root_hook(mod, args, out):
        if torch.is_tensor(out):
            if not out.requires_grad:
                out = out.detach().requires_grad_()
            root["t"] = out
            return out

    flags = [] if emb is not None else [(m.weight, m.weight.requires_grad) for _, m in targets]
    handles = [m.register_forward_hook(hook(n)) for n, m in targets]
    if emb is not None:
        handles.append(emb.register_forward_hook(root_hook))
    was_training = model.training
    model.eval()
    start, tokens = time.perf_counter(), 0
    try:
        for w, _ in flags:
            w.requires_grad_(True)  # so that every output is in the graph (no .grad is accumulated)
        with torch.enable_grad():
            for batch in batches:
                outs.clear()
                root.clear()
                if isinstance(batch, dict):
                    inputs = {k: v for k, v in batch.items() if k != "labels"}
                    labels = batch.get("labels", batch.get("input_ids"))
                else:
                    inputs, labels = {"input_ids": batch}, batch
                state["mask"], state["keeps"], state["rows"] = attention_mask(batch), {}, {}
                keep = token_mask(state["mask"], labels.shape)
                if keep is not None:  # pads are no targets (a new tensor: the batch's own labels are left as they are)
                    labels = labels.masked_fill(~keep.to(labels.device).view(labels.shape), -100)
                with (torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
                      if offload_activations else contextlib.nullcontext()):
                    logits = model(**inputs).logits[:, :-1].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="sum")
                del logits
                if emb is not None:
                    if "t" not in root:
                        raise RuntimeError("collect_output_fisher: the input embeddings were not called")
                    if loss.requires_grad:
                        torch.autograd.grad(loss, [root["t"]], allow_unused=True)  # the hooks do the sums
                elif outs:
                    grads = torch.autograd.grad(loss, [o for _, o, _ in outs], allow_unused=True)
                    for (n, o, shape), g in zip(outs, grads):
                        if g is not None:
                            add(n, g, shape, state["mask"], state["keeps"])
                    del grads
                tokens += int((labels[:, 1:] != -100).sum())
                del loss
                root.clear()
    finally:
        outs.clear()
        root.clear()
        for h in handles:
            h.remove()
        for w, flag in flags:
            w.requires_grad_(flag)
        model.train(was_training)
    missing = [n for n, _ in targets if n not in sums]
    if missing:
        raise RuntimeError(f"collect_output_fisher: {len(missing)} layers were never called, e.g. {missing[:3]}")
    fisher = {n: sums[n] / max(counts[n], 1) for n, _ in targets}
    logger.info("LoSparse calibration (output Fisher): %d predicted tokens, %d layers, %.1f s", tokens, len(fisher),
                time.perf_counter() - start)
    return fisher


def run_batch(model, batch):
    """``model(**batch)`` without its labels, or ``model(batch)`` for a tensor (the calibration passes)."""
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    return model(batch)


def statistics_bytes(model, allow_name=None, block_name=None):
    """``{block: bytes}``: an upper bound of the input statistics :func:`collect_input_covariance` holds per decoder
    block (``block_key``), ``in^2`` float64 entries per layer to replace (layers sharing an input share one
    ``C``, so the bound counts a shared input once per layer: 3x for q/k/v)."""
    sizes = {}
    for n, m in _calibration_targets(model, allow_name, block_name, None, "statistics_bytes"):
        sizes[block_key(n)] = sizes.get(block_key(n), 0) + m.in_features ** 2 * 8
    return sizes


def blocks_per_pass(model, budget_bytes, allow_name=None, block_name=None):
    """How many decoder blocks one streaming pass may measure so that its statistics stay under ``budget_bytes``
    (:func:`statistics_bytes`): 0 (one pass, every layer at once, :func:`collect_input_covariance`) when all of
    them fit, else at least 1 (:class:`InputCovariances`)."""
    sizes = statistics_bytes(model, allow_name, block_name)
    if sum(sizes.values()) <= budget_bytes:
        return 0
    return max(1, int(budget_bytes // max(sizes.values())))


def memory_budget(device, fraction=0.5):
    """``fraction`` of the memory free on ``device`` now (CUDA: ``torch.cuda.mem_get_info``; CPU: the kernel's
    ``MemAvailable``), in bytes; None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * fraction)
    except OSError:
        pass
    return None
