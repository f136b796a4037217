"""FSDP2 on CPU: 2 processes (torch.distributed.run, gloo), the model sharded by ``--fsdp2`` / ``utils.apply_fsdp2``.

Every parameter is then a ``DTensor`` holding whole rows on each rank; the Pruner scores and masks the local rows and
finds the global threshold from all ranks' scores. Compared against one process with the same global batch (as
tests/test_multi_process.py does for DDP: each rank takes every other chunk of the batch, dropout off, so only the
float summation order differs):

- the Pruner alone, on a small model with 21-row matrices (uneven shards) in six configurations (rows, row_col
  with mean and max, column min with the uncertainty term, unstructured, Magnitude): masks equal at every step, mask
  thresholds within 1e-5, statistics and weights within 1e-6, and a Pruner rebuilt mid-run from ``state_dict`` (the
  gathered, single-process layout) continues bit-exactly;
- ``run_glue.py --fsdp2`` on a tiny BERT (also with gradient accumulation): the log says the model is sharded over
  2 ranks, masks equal to one process at every step and identical on both ranks, scores and final weights within
  the DDP test's tolerances, the checkpoint folder (``save_state``) and the final files (``pytorch_model.bin``,
  ``compact/``) with the same keys and shapes as one process's, and a run resumed from that checkpoint ends
  bit-identical to the uninterrupted one.

The Pruner test's ranks record their own rows only (no collective per step); ``run_glue.py``'s worker gathers.
"""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_tokenizer, tiny_config

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
STEPS = 12  # 3 epochs of 4 global batches of 8 (32 examples)
TRAIN = ["--max_train_steps", STEPS, "--learning_rate", 1e-2, "--num_warmup_steps", 2, "--seed", 3,
         "--per_device_eval_batch_size", 8, "--low_rank_parameter_ratio", 0.1875, "--final_threshold", 0.2,
         "--warmup_steps", 2, "--initial_warmup", 1, "--final_warmup", 2, "--deltaT", 2, "--checkpointing_steps", 6]
WEIGHT_ATOL, KEY_BIAS_ATOL = 2e-5, 2e-4  # those of the DDP test

GLUE_WORKER = r'''
"""Run run_glue.main(argv); save what every rank saw (full tensors) to OUT/rank<r>.pt."""
import os
import sys

import torch

import run_glue
import losparse.common
import utils

out = sys.argv[1]
steps, final = [], {}
_update, _report = utils.Pruner.update_and_pruning, utils.compression_report


def full(t):
    return (t.full_tensor() if utils.is_sharded(t) else t).detach().clone()


def update_and_pruning(self, model, global_step):
    threshold, mask_threshold = _update(self, model, global_step)
    params = self._masked_params(model)
    steps.append({"step": global_step, "threshold": threshold, "mask_threshold": mask_threshold,
                  "zero_rows": {n: (full(p) == 0).all(dim=1) for n, p in params},
                  "local_rows": {n: losparse.common.local_part(p).shape[0] for n, p in params},
                  "scores": self.state_dict()["exp_avg_ipt"]})  # gathered: every rank calls it
    return threshold, mask_threshold


def compression_report(model, *args, **kwargs):
    final["model"] = model  # the last call is on the model gathered after training
    return _report(model, *args, **kwargs)


utils.Pruner.update_and_pruning, utils.compression_report = update_and_pruning, compression_report
results = run_glue.main(sys.argv[2:])
dist = torch.distributed.is_initialized()
rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
state = {k: v.detach().clone() for k, v in final["model"].state_dict().items()}
torch.save({"world_size": world, "steps": steps, "results": results, "state_dict": state,
            "sharded": any(utils.is_sharded(p) for p in final["model"].parameters())},
           os.path.join(out, f"rank{rank}.pt"))
'''

PRUNER_WORKER = r'''
"""The Pruner on FSDP2 row shards (or one process): OUT/rank<r>.pt holds, per configuration, every step's masks."""
import argparse
import os
import sys

import torch
from torch import nn

import losparse.common
import utils

out = sys.argv[1]
if "WORLD_SIZE" in os.environ:
    torch.distributed.init_process_group("gloo")
dist = torch.distributed.is_initialized()
rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
CONFIGS = {  # name -> (Pruner keyword arguments, extra flags)
    "row_mean": ({}, []),
    "row_col_mean": ({"structured_direction": "row_col"}, []),  # rows of query, columns of dense
    "row_col_max": ({"structured_method": "max", "structured_direction": "row_col"}, []),
    "col_min_unc": ({"structured_method": "min", "structured_direction": "col"}, ["--beta2", "0.5"]),
    "unstructured": ({"structured_method": None}, []),
    "magnitude": ({"pruner_name": "Magnitude"}, []),
}
STEPS, RESUME_AT = 8, 5
RESUMED = ("row_col_mean", "row_col_max", "unstructured")  # also run rebuilt from state_dict mid-run


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(16, 21)  # 21 rows: 11 + 10 on two ranks
        self.dense = nn.Linear(21, 16)

    def forward(self, x):
        return x + self.dense(torch.relu(self.query(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.head(x)


def full(t):
    return (t.full_tensor() if utils.is_sharded(t) else t).detach().clone()


results = {}
for name, (kwargs, flags) in CONFIGS.items():
    parser = argparse.ArgumentParser()
    utils.add_losparse_args(parser)
    args = parser.parse_args(["--final_threshold", "0.3", "--warmup_steps", "2", "--initial_warmup", "1",
                              "--final_warmup", "2", "--deltaT", "2", *flags])
    runs = {}
    for mode in ("straight", "resumed") if name in RESUMED else ("straight",):
        torch.manual_seed(0)
        model = Net()
        utils.substitute_layer_weights(model, ["query", "dense"], [], parameter_ratio=0.2)
        model = utils.apply_fsdp2(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        pruner = utils.Pruner(model, args, total_step=STEPS, **kwargs)
        data = torch.Generator().manual_seed(1)
        steps = []
        for step in range(STEPS):
            x = torch.randn(8, 16, generator=data)
            per = 8 // world
            model(x[rank * per:(rank + 1) * per]).pow(2).mean().backward()
            opt.step()
            if mode == "resumed" and step == RESUME_AT:  # a new Pruner from the saved (gathered) state
                state = pruner.state_dict()
                pruner = utils.Pruner(model, args, total_step=STEPS, **kwargs)
                pruner.load_state_dict(state)
            _, mask_threshold = pruner.update_and_pruning(model, step)
            opt.zero_grad()
            steps.append({"mask_threshold": mask_threshold,  # this rank's rows: no collective per step
                          "zeros": {n: losparse.common.local_part(p).detach() == 0 for n, p in model.named_parameters()
                                    if n.endswith("sparse.weight")}})
        runs[mode] = {"steps": steps, "state": pruner.state_dict(),
                      "weights": {n: full(p) for n, p in model.named_parameters()},
                      # a repr on one rank only: it must not run a collective (it would hang here)
                      "repr": repr(model) if rank == 0 else None,
                      "cache_derived": [m.cache_derived for m in model.modules()
                                        if isinstance(m, utils.LinearLoSparse)]}
    results[name] = runs
torch.save({"world_size": world, "results": results}, os.path.join(out, f"rank{rank}.pt"))
'''


# ----------------------------------------------------------------------------------------------------
# Fixtures and launch helpers
# ----------------------------------------------------------------------------------------------------
def _env(root):
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "WANDB_DISABLED": "true",
                "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_CACHE": str(root / "hf_datasets"), **ENV})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(root, script, nproc, out, args):
    """``python script out args`` in one process, or under ``torch.distributed.run`` in ``nproc``."""
    out.mkdir(parents=True, exist_ok=True)
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [sys.executable, *launcher, str(script), str(out), *[str(a) for a in args]]
    proc = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)], proc.stdout + proc.stderr


def _write_csv(path, n, rng):
    pos, neg = ["good", "great", "fine", "love"], ["bad", "terrible", "awful", "hate"]
    filler = ["the", "a", "movie", "film", "cat", "dog", "was", "is", "it", "this", "day", "night", "city"]
    with open(path, "w") as f:
        f.write("sentence,label\n")
        for i in range(n):
            words = [rng.choice(filler) for _ in range(rng.randint(3, 8))]
            words.insert(rng.randrange(len(words) + 1), rng.choice(pos if i % 2 else neg))
            f.write(f"{' '.join(words)},{i % 2}\n")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("fsdp2")
    torch.manual_seed(0)
    # Dropout off: with it, 1 x 8 and 2 x 4 would draw different masks for the same examples.
    cfg = tiny_config("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    _write_csv(root / "train.csv", 32, rng)  # a multiple of the global batch: no short batch
    _write_csv(root / "validation.csv", 16, rng)
    (root / "glue_worker.py").write_text(GLUE_WORKER)
    (root / "pruner_worker.py").write_text(PRUNER_WORKER)
    return root


@pytest.fixture(scope="module")
def glue(assets):
    cache = {}

    def get(name):
        if name not in cache:
            nproc, batch, extra = {"single": (1, 8, []), "fsdp2": (2, 4, ["--fsdp2"]),
                                   "fsdp2_accum": (2, 2, ["--fsdp2", "--gradient_accumulation_steps", 2]),
                                   "resumed": (2, 4, ["--fsdp2", "--resume_from_checkpoint",
                                                      assets / "fsdp2" / "output" / "step_6"])}[name]
            if name == "resumed":
                get("fsdp2")
            out = assets / name
            args = ["--model_name_or_path", assets / "model", "--train_file", assets / "train.csv",
                    "--validation_file", assets / "validation.csv", *TRAIN, "--per_device_train_batch_size", batch,
                    "--output_dir", out / "output", *extra]
            cache[name] = (out, *_launch(assets, assets / "glue_worker.py", nproc, out, args))
        return cache[name]

    return get


# ----------------------------------------------------------------------------------------------------
# The Pruner on row shards
# ----------------------------------------------------------------------------------------------------
def test_pruner_on_row_shards_matches_one_process(assets, tmp_path, monkeypatch):
    import runpy

    shards, _ = _launch(assets, assets / "pruner_worker.py", 2, tmp_path / "two", [])
    (tmp_path / "one").mkdir()
    monkeypatch.setattr(sys, "argv", ["pruner_worker.py", str(tmp_path / "one")])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    runpy.run_path(str(assets / "pruner_worker.py"), run_name="__main__")  # one process: in this one
    single = torch.load(tmp_path / "one" / "rank0.pt", weights_only=False)
    assert single["world_size"] == 1 and [r["world_size"] for r in shards] == [2, 2]
    for name, result in single["results"].items():
        one = result["straight"]
        pruned = [int(z.sum()) for z in one["steps"][-1]["zeros"].values()]
        assert 0 < sum(pruned) < sum(z.numel() for z in one["steps"][-1]["zeros"].values()), name
        for mode in shards[0]["results"][name]:
            ranks = [r["results"][name][mode] for r in shards]
            # really sharded: 21 rows -> 11 + 10, 16 rows -> 8 + 8
            assert {tuple(r["steps"][0]["zeros"][n].shape[0] for r in ranks) for n in one["steps"][0]["zeros"]} \
                == {(11, 10), (8, 8)}
            for step, b in enumerate(one["steps"]):
                for a in (r["steps"][step] for r in ranks):
                    assert (a["mask_threshold"] is None) == (b["mask_threshold"] is None), (name, step)
                    if b["mask_threshold"] is not None:
                        assert a["mask_threshold"] == pytest.approx(b["mask_threshold"], rel=1e-5), (name, step)
                assert ranks[0]["steps"][step]["mask_threshold"] == ranks[1]["steps"][step]["mask_threshold"]
                for n in b["zeros"]:  # the rows of rank 0 then rank 1: the masks of one process
                    assert torch.equal(torch.cat([r["steps"][step]["zeros"][n] for r in ranks]), b["zeros"][n]), \
                        (name, mode, step, n)
        assert one["cache_derived"] and all(one["cache_derived"]) and "sparse_rows=" in one["repr"]
        for rank, r in enumerate(shards):
            for mode in r["results"][name]:
                run = r["results"][name][mode]
                # FSDP2 re-gathers parameters at version 0: compacted layers must not cache derived tensors
                assert run["cache_derived"] and not any(run["cache_derived"]), name
                assert rank or "sparse_rows=sharded" in run["repr"]
                for k, w in one["weights"].items():
                    assert torch.allclose(run["weights"][k], w, atol=1e-6, rtol=0), (name, k)
                for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):  # gathered: the single-process layout
                    assert run["state"][kind].keys() == one["state"][kind].keys(), (name, kind)
                    for k, t in one["state"][kind].items():
                        assert run["state"][kind][k].shape == t.shape, (name, kind, k)
                        assert torch.allclose(run["state"][kind][k], t, atol=1e-6, rtol=1e-5), (name, kind, k)
            if "resumed" not in r["results"][name]:
                continue
            straight, resumed = r["results"][name]["straight"], r["results"][name]["resumed"]
            for k in straight["weights"]:  # rebuilt from the gathered state_dict: bit-exact
                assert torch.equal(straight["weights"][k], resumed["weights"][k]), (name, k)
            for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                for k in straight["state"][kind]:
                    assert torch.equal(straight["state"][kind][k], resumed["state"][kind][k]), (name, kind, k)


# ----------------------------------------------------------------------------------------------------
# run_glue.py --fsdp2
# ----------------------------------------------------------------------------------------------------
def _zero_rows(state_dict):
    return {k: (v == 0).all(dim=1) for k, v in state_dict.items() if k.endswith("sparse.weight")}


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_accum"])
def test_run_glue_fsdp2_matches_one_process(glue, name):
    """2 x 4, and 2 x 2 with 2 accumulation steps, against 1 x 8."""
    _, (single,), _ = glue("single")
    out, (r0, r1), log = glue(name)
    # BERT's _no_split_modules: the embeddings and the 2 layers are sharded on their own, then the root
    assert "model sharded with FSDP2 (fully_shard) over 2 ranks: 3 blocks (BertEmbeddings, BertLayer) + the root" in log
    assert r0["world_size"] == r1["world_size"] == 2
    assert not r0["sharded"] and r0["steps"][0]["local_rows"] != single["steps"][0]["local_rows"]
    assert [s["step"] for s in r0["steps"]] == [s["step"] for s in single["steps"]] == list(range(STEPS))
    masked = 0
    for a, b, c in zip(r0["steps"], r1["steps"], single["steps"]):
        assert (a["threshold"], a["mask_threshold"]) == (b["threshold"], b["mask_threshold"]), a["step"]
        assert a["threshold"] == c["threshold"] and (a["mask_threshold"] is None) == (c["mask_threshold"] is None)
        if c["mask_threshold"] is not None:
            masked += 1
            assert a["mask_threshold"] == pytest.approx(c["mask_threshold"], rel=1e-4), a["step"]
        assert len(c["zero_rows"]) == 12
        for n in c["zero_rows"]:
            assert torch.equal(a["zero_rows"][n], b["zero_rows"][n]), (a["step"], n)  # identical across ranks
            assert torch.equal(a["zero_rows"][n], c["zero_rows"][n]), (a["step"], n)  # equal to one process
            assert torch.allclose(a["scores"][n], c["scores"][n], rtol=1e-3, atol=1e-7), (a["step"], n)
    assert masked >= 4
    for k, w in single["state_dict"].items():
        diff = (r0["state_dict"][k] - w).abs().max().item()
        assert diff <= (KEY_BIAS_ATOL if k.endswith("key.bias") else WEIGHT_ATOL), (k, diff)
        assert torch.equal(r0["state_dict"][k], r1["state_dict"][k]), k
    zero = _zero_rows(r0["state_dict"])
    assert 0 < sum(int(z.sum()) for z in zero.values())
    assert r0["results"]["effective_ratio"] == single["results"]["effective_ratio"]
    saved = torch.load(out / "output" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    for k, v in saved.items():
        assert torch.equal(v, r0["state_dict"][k]), k
    assert json.loads((out / "output" / "all_results.json").read_text())["effective_ratio"] == \
        single["results"]["effective_ratio"]


def _layout(path):
    """Keys and shapes of every file in a checkpoint / output folder (recursively), the values aside."""
    from safetensors.torch import load_file

    def shapes(obj):
        if torch.is_tensor(obj):
            return ("tensor", tuple(obj.shape), str(obj.dtype))
        if isinstance(obj, dict):
            return {k: shapes(v) for k, v in obj.items() if k not in ("initial_lr",)}
        if isinstance(obj, (list, tuple)):
            return [shapes(v) for v in obj]
        return type(obj).__name__

    layout = {}
    for f in sorted(path.rglob("*")):
        rel = str(f.relative_to(path))
        if f.name.startswith("random_states") or not f.is_file():
            continue
        if f.suffix == ".safetensors":
            layout[rel] = shapes(load_file(str(f)))
        elif f.suffix in (".bin", ".pkl"):
            layout[rel] = shapes(torch.load(str(f), map_location="cpu", weights_only=False))
        else:
            layout[rel] = "file"
    return layout


def test_fsdp2_checkpoints_have_the_single_process_layout(glue):
    single_out, _, _ = glue("single")
    out, _, _ = glue("fsdp2")
    assert _layout(out / "output" / "step_6") == _layout(single_out / "output" / "step_6")
    final = {k: v for k, v in _layout(out / "output").items() if not k.startswith(("step_", "epoch_"))}
    assert final == {k: v for k, v in _layout(single_out / "output").items() if not k.startswith(("step_", "epoch_"))}
    assert "compact/losparse_model.safetensors" in final and "pytorch_model.bin" in final


def test_fsdp2_resume_is_exact(glue):
    _, (a0, _), _ = glue("fsdp2")
    _, (b0, b1), log = glue("resumed")
    assert "Resumed from checkpoint" in log
    assert [s["step"] for s in b0["steps"]] == list(range(6, STEPS))
    for sa, sb in zip(a0["steps"][6:], b0["steps"]):
        assert sa["mask_threshold"] == sb["mask_threshold"], sa["step"]
        for n in sa["zero_rows"]:
            assert torch.equal(sa["zero_rows"][n], sb["zero_rows"][n]), (sa["step"], n)
            assert torch.equal(sa["scores"][n], sb["scores"][n]), (sa["step"], n)
    for k, v in a0["state_dict"].items():
        assert torch.equal(v, b0["state_dict"][k]) and torch.equal(v, b1["state_dict"][k]), k


# ----------------------------------------------------------------------------------------------------
# What the scripts accept
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_check_distributed_support_accepts_fsdp2_only(version):
    """Accelerate's FSDP plugin: version 2 (DTensor row shards) is accepted, version 1 (flat parameters) refused with
    a message that points to FSDP2."""
    import argparse

    from accelerate.utils import DistributedType

    import utils

    fake = argparse.Namespace(distributed_type=DistributedType.FSDP, num_processes=2,
                              state=argparse.Namespace(fsdp_plugin=argparse.Namespace(fsdp_version=version)))
    if version == 2:
        utils.check_distributed_support(fake)
    else:
        with pytest.raises(RuntimeError, match=r"FSDP with fsdp_version 1.*--fsdp_version 2 .*--fsdp2"):
            utils.check_distributed_support(fake)


def test_fsdp2_flag_and_single_process_fallback(caplog):
    """--fsdp2 comes with the shared LoSparse flags; with one process there is nothing to shard and the model is
    returned as it is (with a warning); gathering an unsharded model returns it too."""
    import argparse

    from torch import nn

    import utils

    parser = argparse.ArgumentParser()
    utils.add_losparse_args(parser)
    assert parser.parse_args(["--fsdp2"]).fsdp2 and not parser.parse_args([]).fsdp2
    model = nn.Sequential(nn.Linear(4, 4))
    with caplog.at_level("WARNING", logger="losparse"):
        assert utils.apply_fsdp2(model) is model
    assert "single process: nothing to shard" in caplog.text
    assert utils.fsdp2_full_model(model) is model


# ----------------------------------------------------------------------------------------------------
# In this process, on a world of one rank (gloo): every collective runs, over one rank
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def world_of_one(tmp_path):
    dist = torch.distributed
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method,direction,beta2,pruner_name,keep", [
    ("mean", "row", 1.0, "PLATON", False),  # reduced statistics, scores straight from the flat buffers
    ("sum", "col", 1.0, "PLATON", False),  # reduced column sums (all-reduced)
    ("max", "col", 0.5, "PLATON", False),  # element statistics, column aggregates (all-reduced)
    ("mean", "row_col", 2.0, "PLATON", False),  # rows of query, columns of dense
    (None, "row", 1.0, "PLATON", False),  # unstructured
    ("min", "col", 1.0, "Magnitude", False),
    ("mean", "row", 1.0, "PLATON", True),  # keep_zero_rows: the held rows gathered from the shards
])
def test_the_three_distributions_give_identical_masks(world_of_one, method, direction, beta2, pruner_name, keep):
    """One process (``Local``), DDP (``Replicated``: rank 0's scores broadcast) and FSDP2 row shards
    (``RowShards``: the sparse matrices as ``DTensor`` row shards, each reduction a collective) run the same pruning
    maths: the same mask thresholds, masks and statistics at every step; with ``keep_zero_rows`` the same rows held
    at zero."""
    import argparse
    import copy

    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import losparse.common
    import losparse.distributed
    import utils

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(12, 21)
            self.dense = nn.Linear(21, 16)

    mesh = init_device_mesh("cpu", (1,))
    parser = argparse.ArgumentParser()
    utils.add_losparse_args(parser)
    args = parser.parse_args(["--final_threshold", "0.3", "--warmup_steps", "2", "--initial_warmup", "1",
                              "--final_warmup", "2", "--deltaT", "2", "--beta2", str(beta2)])
    torch.manual_seed(0)
    base = Net()
    utils.substitute_layer_weights(base, ["query", "dense"], [], parameter_ratio=0.2)
    held = {"query": [0, 3, 5, 20], "dense": [1, 2]}  # rows removed before training (keep_zero_rows)
    if keep:
        with torch.no_grad():
            for name, rows in held.items():
                getattr(base, name).sparse.weight[rows] = 0.0
    runs = {}
    for kind in ("local", "replicated", "rows"):
        model = copy.deepcopy(base)
        if kind == "rows":
            for m in (model.query, model.dense):
                m.sparse.weight = nn.Parameter(distribute_tensor(m.sparse.weight.detach(), mesh, [Shard(0)]))
        pruner = utils.Pruner(model, args, total_step=12, structured_method=method, structured_direction=direction,
                              pruner_name=pruner_name, keep_zero_rows=keep)
        assert type(pruner._dist) is (losparse.distributed.RowShards if kind == "rows" else losparse.distributed.Local)
        if kind == "replicated":
            pruner._dist = losparse.distributed.Replicated()
        g = torch.Generator().manual_seed(1)
        steps = []
        for step in range(12):
            for m in (model.query, model.dense):
                p = m.sparse.weight
                grad = torch.randn(p.shape, generator=g) * (1 + torch.rand(p.shape[0], 1, generator=g))
                p.grad = distribute_tensor(grad, mesh, [Shard(0)]) if kind == "rows" else grad
                with torch.no_grad():
                    losparse.common.local_part(p).sub_(0.01 * grad)
            _, mask_threshold = pruner.update_and_pruning(model, step)
            steps.append((mask_threshold, [(m.sparse.weight.full_tensor() if kind == "rows" else m.sparse.weight)
                                           .detach().clone() for m in (model.query, model.dense)]))
        runs[kind] = (steps, pruner.state_dict())
    local_steps, local_state = runs["local"]
    assert sum(t is not None for t, _ in local_steps) >= 6
    if keep:  # every step, every distribution: the held rows are zero (the updates above regrow them)
        for kind, (steps, state) in runs.items():
            assert all(bool((w[held[n]] == 0).all()) for _, ws in steps for n, w in zip(("query", "dense"), ws)), kind
            assert [r.nonzero().flatten().tolist() for r in state["zero_rows"].values()] == list(held.values())
    assert 0 < sum(int((w == 0).sum()) for w in local_steps[-1][1]) < sum(w.numel() for w in local_steps[-1][1])
    for kind in ("replicated", "rows"):
        steps, state = runs[kind]
        for step, ((ta, wa), (tb, wb)) in enumerate(zip(local_steps, steps)):
            assert ta == tb, (kind, step)
            assert all(torch.equal(a, b) for a, b in zip(wa, wb)), (kind, step)
        assert state.keys() == local_state.keys() and state["layout"] == local_state["layout"]
        for stat in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            assert state[stat].keys() == local_state[stat].keys(), (kind, stat)
            assert all(torch.equal(state[stat][n], t) for n, t in local_state[stat].items()), (kind, stat)


def test_fsdp2_checkpointing_registers_hooks_and_replaces_no_method(world_of_one):
    """``fsdp2_checkpointing`` works through hooks (Accelerate's save/load pre-hooks, the optimizer's state_dict
    hooks): no method of the optimizer or the model is replaced; ``optimizer.state_dict()`` is that of one process
    (full tensors, parameter indices) and ``load_state_dict`` takes it back into the shards; the sharded model's
    record is an attribute of the model, not module state."""
    import copy

    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import utils
    import utils_fsdp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    plain = copy.deepcopy(model)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    assert all(utils.is_sharded(p) for p in model.parameters())
    opt, ref = torch.optim.AdamW(model.parameters(), lr=0.1), torch.optim.AdamW(plain.parameters(), lr=0.1)
    x = torch.randn(5, 8)
    for m, o in ((model, opt), (plain, ref)):
        m(x).pow(2).mean().backward()
        o.step()
        o.zero_grad()

    class Registry:  # the two Accelerate calls fsdp2_checkpointing makes
        def __init__(self):
            self.save, self.load = [], []

        def register_save_state_pre_hook(self, hook):
            self.save.append(hook)

        def register_load_state_pre_hook(self, hook):
            self.load.append(hook)

    accelerator = Registry()
    utils.fsdp2_checkpointing(accelerator, model, opt)
    assert len(accelerator.save) == len(accelerator.load) == 1
    for obj in (opt, model):
        for name in ("state_dict", "load_state_dict"):
            assert name not in vars(obj) and getattr(type(obj), name) is getattr(obj, name).__func__, name
    full, expected = opt.state_dict(), ref.state_dict()
    assert full["param_groups"] == expected["param_groups"] and list(full["state"]) == [0, 1, 2, 3]
    for i, entry in expected["state"].items():
        assert full["state"][i].keys() == entry.keys()
        for k, v in entry.items():
            got = full["state"][i][k]
            assert not utils.is_sharded(got) and got.shape == v.shape and got.device.type == "cpu", (i, k)
            assert torch.allclose(got, v, atol=1e-6, rtol=0), (i, k)
    opt.load_state_dict(copy.deepcopy(full))  # back into the shards
    for i, p in enumerate(model.parameters()):
        assert utils.is_sharded(opt.state[p]["exp_avg"])
        assert torch.equal(opt.state[p]["exp_avg"].full_tensor(), full["state"][i]["exp_avg"])
    weights = [None]
    accelerator.save[0]([model], weights, "unused")  # the full weights go to model.safetensors
    assert weights[0].keys() == plain.state_dict().keys()
    assert all(not utils.is_sharded(v) and v.shape == plain.state_dict()[k].shape for k, v in weights[0].items())
    assert not hasattr(utils, "_UNSHARDED") and not hasattr(utils_fsdp, "_UNSHARDED")


def test_fsdp2_helpers_under_every_name():
    """``utils``, ``utils_fsdp`` (the module of earlier versions) and ``losparse`` give the same FSDP2 helpers; an
    unsharded model needs none of the FSDP2 machinery (fsdp2_full_model / fsdp2_checkpointing return at once)."""
    import losparse
    import losparse.fsdp2
    import utils
    import utils_fsdp

    for name in ("apply_fsdp2", "fsdp2_checkpointing", "fsdp2_full_model"):
        assert getattr(utils, name) is getattr(utils_fsdp, name) is getattr(losparse, name) \
            is getattr(losparse.fsdp2, name), name
    m = torch.nn.Linear(2, 2)
    assert utils.fsdp2_full_model(m) is m and utils.fsdp2_checkpointing(None, m, None) is None
