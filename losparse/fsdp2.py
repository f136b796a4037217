"""FSDP2 (``fully_shard``): models bigger than one GPU.

1. ``apply_fsdp2(model, accelerator)``        shard the model after STEP 1 (every parameter becomes a ``DTensor``
                                              holding whole rows on each rank: the ``Pruner`` masks them in place)
2. ``fsdp2_checkpointing(accelerator, model, optimizer)``  after ``accelerator.prepare``: ``save_state`` /
                                              ``load_state`` write and read the files of one process
3. ``fsdp2_full_model(model)``                after training: a plain copy with the full weights, for saving

Built on ``torch.distributed.fsdp.fully_shard`` and ``torch.distributed.checkpoint.state_dict``. What this module
needs to remember about a sharded model is stored on the model itself (``model._losparse_fsdp2``). An unsharded
model needs none of it: ``fsdp2_checkpointing`` and ``fsdp2_full_model`` return at once.
"""
import copy

import torch
from torch import nn

from .checkpoint import read_state_dict
from .common import is_sharded, local_part, logger, unwrap
from .layer import LinearLoSparse

__all__ = ["apply_fsdp2", "fsdp2_checkpointing", "fsdp2_full_model"]


class _Unsharded:
    """What :func:`apply_fsdp2` records on the model (``model._losparse_fsdp2``): its structure before sharding,
    with parameters on the meta device. A plain object, so ``nn.Module`` does not register it as a submodule."""

    def __init__(self, skeleton):
        self.skeleton = skeleton


def _fsdp2_blocks(model):
    """The transformer blocks: modules whose class is in ``model._no_split_modules``, else the children of every
    ``nn.ModuleList`` (``encoder.layer``, ``model.layers``, ...); outermost last, the root excluded."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not blocks:
        blocks = [c for m in model.modules() if isinstance(m, nn.ModuleList) for c in m if c is not model]
    seen, out = set(), []
    for m in reversed(blocks):  # children before their parents
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _meta_twin(model):
    """A copy of ``model`` whose parameters are on the meta device (ties kept; buffers and attributes copied)."""
    memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _fully_shard_kwargs(accelerator, extra):
    """``fully_shard`` settings: those of Accelerate's FSDP2 plugin when it is active, then ``extra``."""
    kwargs = {}
    if accelerator is not None and getattr(accelerator, "is_fsdp2", False):
        plugin = accelerator.state.fsdp_plugin
        kwargs["reshard_after_forward"] = plugin.reshard_after_forward
        if plugin.mixed_precision_policy is not None:
            kwargs["mp_policy"] = plugin.mixed_precision_policy
        if plugin.cpu_offload is not None:
            kwargs["offload_policy"] = plugin.cpu_offload
    kwargs.update(extra)
    return kwargs


def apply_fsdp2(model, accelerator=None, **fully_shard_kwargs):
    """Shard ``model`` with PyTorch's FSDP2 across the processes torchrun / Accelerate started (CPU gloo or GPUs).

    ``torch.distributed.fsdp.fully_shard`` is applied to every transformer block (see :func:`_fsdp2_blocks`), then
    to the root, over a 1-D mesh of all ranks: each parameter becomes a ``DTensor`` holding whole rows on each
    rank, which the :class:`losparse.Pruner` scores and masks where they live. Call it after STEP 1 (and after loading
    any checkpoint) and before building the optimizer. With ``accelerator`` under Accelerate's FSDP2 plugin its
    ``reshard_after_forward``, mixed precision and CPU offload settings are used, and ``accelerator.prepare``
    then keeps the sharded model as it is; otherwise the model is registered with ``accelerator`` (autocast,
    ``save_state``) without a DDP wrapper. Extra ``fully_shard_kwargs`` go to every ``fully_shard`` call. One
    process: nothing to shard, the model is returned unchanged. See :func:`fsdp2_checkpointing` and
    :func:`fsdp2_full_model`.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        logger.warning("LoSparse: FSDP2 requested with a single process: nothing to shard, training unsharded")
        return model
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        return model
    accelerate_fsdp2 = accelerator is not None and getattr(accelerator, "is_fsdp2", False)
    kwargs = _fully_shard_kwargs(accelerator, fully_shard_kwargs)
    device = accelerator.device if accelerator is not None else \
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    record = _Unsharded(_meta_twin(model))
    blocks = _fsdp2_blocks(model)
    kinds = ", ".join(sorted({type(b).__name__ for b in blocks})) or "none"
    for block in blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    for m in model.modules():  # FSDP2 re-gathers parameters into the same storage without bumping their versions
        if isinstance(m, LinearLoSparse):
            m.cache_derived = False
    if callable(getattr(model, "generate", None)):  # generate() calls the encoder directly: gather the root first
        register_fsdp_forward_method(model, "generate")
    model._losparse_fsdp2 = record
    local = sum(local_part(p).numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoSparse: model sharded with FSDP2 (fully_shard) over %d ranks: %d blocks (%s) + the root; this "
                "rank holds %d of %d parameters", world, len(blocks), kinds, local, total)
    if accelerator is not None and not accelerate_fsdp2:
        model = accelerator.prepare_model(model, evaluation_mode=True)  # autocast and save_state, no DDP wrapper
    return model


# Checkpoints in the single-process layout ----------------------------------------------------------------------
def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _save_model_hook(target):
    """Accelerate save pre-hook: the full weights of ``target`` (a collective; every rank runs the hooks)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    def hook(models, weights, output_dir):
        for i, m in enumerate(models):
            if unwrap(m) is target:
                weights[i] = get_model_state_dict(target, options=_full_options())

    return hook


def _load_model_hook(target):
    """Accelerate load pre-hook: load the full weights into ``target``'s shards (and take it off Accelerate's list)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    def hook(models, input_dir):
        for m in list(models):
            if unwrap(m) is not target:
                continue
            sd = read_state_dict(input_dir)
            ties = {}
            for n, p in target.named_parameters(remove_duplicate=False):
                ties.setdefault(id(p), []).append(n)
            for names in ties.values():  # safetensors keeps one key of tied weights
                src = next((n for n in names if n in sd), None)
                for n in names:
                    if src is not None and n not in sd:
                        sd[n] = sd[src]
            set_model_state_dict(target, sd, options=StateDictOptions(full_state_dict=True))
            models.remove(m)

    return hook


def _full_optimizer_state_hook(target):
    """``optimizer.state_dict()`` post-hook: the state of one process, gathered with
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (a collective; the tensors are kept on
    rank 0 only), keyed by parameter index as ``torch.optim`` writes it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    gathering = []  # get_optimizer_state_dict calls optimizer.state_dict() itself: that call gets the shards

    def hook(optimizer, state_dict):
        if gathering or not optimizer.state:  # nothing to gather before the first step
            return None
        gathering.append(True)
        try:
            full = get_optimizer_state_dict(target, optimizer, options=_full_options())
        finally:
            gathering.clear()
        # The same parameters in the same order: indices in ``state_dict``, names in ``full`` (empty off rank 0).
        indices = [i for g in state_dict["param_groups"] for i in g["params"]]
        names = [n for g in full.get("param_groups", ()) for n in g["params"]]
        by_name = full.get("state", {})
        return {"state": {i: by_name[n] for i, n in sorted(zip(indices, names)) if n in by_name},
                "param_groups": state_dict["param_groups"]}

    return hook


def _shard_like(value, p):
    """This rank's rows of ``value`` (a full tensor shaped like the FSDP2 parameter ``p``) as a DTensor like ``p``;
    any other value as it is. Every rank holds ``value``: the rows are sliced locally, without communication."""
    if not (is_sharded(p) and torch.is_tensor(value) and not is_sharded(value) and value.dim()
            and tuple(value.shape) == tuple(p.shape)):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(local_part(p).device), p.device_mesh, p.placements, src_data_rank=None)


def _shard_optimizer_state_hook(optimizer, state_dict):
    """``optimizer.load_state_dict()`` pre-hook: the full (single-process) state as this rank's shards."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {i: {k: _shard_like(v, params[int(i)]) for k, v in entry.items()}
             for i, entry in state_dict["state"].items()}
    return {**state_dict, "state": state}


def fsdp2_checkpointing(accelerator, model, optimizer=None):
    """Make ``accelerator.save_state`` / ``load_state`` store a model sharded by :func:`apply_fsdp2` in full.

    The files are those of one process: ``model.safetensors`` with the full weights and ``optimizer.bin`` with
    the full optimizer state (gathered on the main process), so a run resumes bit-exactly, also on another number
    of ranks. The :class:`losparse.Pruner` gathers its statistics itself (``Pruner.state_dict``). Call it on every rank
    after ``accelerator.prepare``. No-op for an unsharded model and under Accelerate's own FSDP2 plugin (which
    writes sharded checkpoints with ``torch.distributed.checkpoint``).

    Uses Accelerate's ``register_save_state_pre_hook`` / ``register_load_state_pre_hook`` for the weights and the
    optimizer's own ``register_state_dict_post_hook`` / ``register_load_state_dict_pre_hook`` for its state:
    ``optimizer.state_dict()`` then gathers (a collective: call it on every rank, as ``save_state`` does) and
    ``optimizer.load_state_dict()`` accepts the full state.
    """
    target = unwrap(model)
    if getattr(accelerator, "is_fsdp2", False) or not any(is_sharded(p) for p in target.parameters()):
        return
    accelerator.register_save_state_pre_hook(_save_model_hook(target))
    accelerator.register_load_state_pre_hook(_load_model_hook(target))
    if optimizer is not None:  # Accelerate saves optimizer.state_dict() of the main process only
        inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside AcceleratedOptimizer
        inner.register_state_dict_post_hook(_full_optimizer_state_hook(target))
        inner.register_load_state_dict_pre_hook(_shard_optimizer_state_hook)


def fsdp2_full_model(model, device="cpu"):
    """A plain (unsharded) copy of a model sharded by :func:`apply_fsdp2`, with its full weights on ``device``.

    A collective: call it on every rank (each gets the copy). Use it after training for what needs whole
    matrices: ``save_pretrained``, :func:`utils.save_checkpoint`, :func:`utils.export_compact`,
    :func:`utils.prune`, :func:`utils.compression_report`. An unsharded model is returned as it is.
    """
    target = unwrap(model)
    if not any(is_sharded(p) for p in target.parameters()):
        return model
    record = getattr(target, "_losparse_fsdp2", None)
    if record is None:
        raise RuntimeError("fsdp2_full_model: the model was not sharded by utils.apply_fsdp2, which records its "
                           "unsharded structure; shard it with utils.apply_fsdp2")
    twin = copy.deepcopy(record.skeleton)
    metas = dict(twin.named_parameters())
    names = [n for n, _ in target.named_parameters()]
    if names != list(metas):
        raise RuntimeError("fsdp2_full_model: the model's parameters changed since apply_fsdp2 "
                           f"({len(names)} now, {len(metas)} then)")
    # Every rank gets the weights, one matrix at a time in full on the accelerator (a model bigger than one GPU
    # still fits on ``device``), in the same order on every rank: one all-gather per sharded parameter.
    new = {}
    for n, p in target.named_parameters():
        full = p.full_tensor() if is_sharded(p) else p
        new[id(metas[n])] = nn.Parameter(full.detach().to(device).clone(), requires_grad=p.requires_grad)
    for m in twin.modules():
        for k, v in m._parameters.items():
            if v is not None:
                m._parameters[k] = new[id(v)]
    buffers = dict(twin.named_buffers())
    for n, b in target.named_buffers():
        if n in buffers:
            buffers[n].copy_((b.full_tensor() if is_sharded(b) else b).detach())
    if hasattr(target, "config"):
        twin.config = target.config
    return twin.train(target.training)
