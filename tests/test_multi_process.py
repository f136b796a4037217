"""Data parallel on CPU: 2 processes (torch.distributed.run, gloo) running run_glue.py on a tiny BERT.

What is compared
- Across ranks, at every optimizer step: the STEP 3 calls (same steps), the threshold, the mask threshold, the
  importance scores and the masks (which rows of every ``sparse.weight`` are zero); at the end, every weight. All
  bit-identical: gradients are all-reduced before STEP 3 and rank 0's scores are broadcast at mask steps.
- Against one process with the same global batch (1 x 8 against 2 x 4, and 2 x 2 x 2 accumulation steps): the
  batches are the same examples (a process takes every other chunk of per_device_batch_size examples of one shuffled
  order, and 64 examples fill every batch), dropout is off, so only the float summation order differs. Masks must be
  equal at every step and weights close after 24 steps at lr 1e-2: within ``WEIGHT_ATOL`` (measured <= 2e-6), the
  attention key biases within ``KEY_BIAS_ATOL`` (measured <= 4e-5: softmax ignores a shift of every key, so their
  gradient is float noise, which Adam turns into steps of up to ~lr * grad / eps).

Each run is a worker script (written to tmp_path) that calls ``run_glue.main`` and records the Pruner's state after
every STEP 3 call and the final model, per rank; it needs no extra flag in run_glue.py. ``ACCELERATE_USE_CPU=true``
makes Accelerate see a CPU multi-process launch (without it every process silently trains alone).

Also: evaluation of run_qa.py and run_summarization.py on 2 processes gathers every example once, in order (the same
predictions as one process); torchrun without ACCELERATE_USE_CPU stops with a message instead of training 2 lone
copies; a compacted model with layers that lost every row of S (``--stored_model_path``) trains under DDP;
``losparse.distributed.broadcast_from_rank0`` makes ranks with different scores agree on rank 0's masks; the three
scripts stop with a clear message under DeepSpeed / FSDP / Megatron-LM before they load a model.
"""
import csv
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_tokenizer, tiny_config

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
STEPS = 24  # 3 epochs of 8 global batches of 8
TRAIN = ["--max_train_steps", STEPS, "--learning_rate", 1e-2, "--num_warmup_steps", 4, "--seed", 3,
         "--per_device_eval_batch_size", 8, "--low_rank_parameter_ratio", 0.1875, "--final_threshold", 0.2,
         "--warmup_steps", 4, "--initial_warmup", 1, "--final_warmup", 2, "--deltaT", 2]
# name -> (processes, per-device batch, accumulation); the global batch is 8 in each.
RUNS = {"single": (1, 8, 1), "ddp": (2, 4, 1), "ddp_accum": (2, 2, 2)}
WEIGHT_ATOL, KEY_BIAS_ATOL = 2e-5, 2e-4

WORKER = r'''
"""Run run_glue.main(argv) in this process; save what every rank saw to OUT/rank<r>.pt."""
import os
import sys

import torch

import run_glue
import utils

out = sys.argv[1]
steps, final = [], {}
_update, _report = utils.Pruner.update_and_pruning, utils.compression_report


def update_and_pruning(self, model, global_step):
    threshold, mask_threshold = _update(self, model, global_step)
    params = self._masked_params(model)
    steps.append({"step": global_step, "threshold": threshold, "mask_threshold": mask_threshold,
                  "zero_rows": {n: (p == 0).all(dim=1) for n, p in params},
                  # the paper's setting (beta2 = 1, mean): the score of a row is the EMA of its importance
                  "scores": {n: self.exp_avg_ipt[n].clone() if n in self.exp_avg_ipt else torch.zeros(p.shape[0])
                             for n, p in params}})
    return threshold, mask_threshold


def compression_report(model, *args, **kwargs):
    final["model"] = model  # the last call is on the unwrapped model, after training
    return _report(model, *args, **kwargs)


utils.Pruner.update_and_pruning, utils.compression_report = update_and_pruning, compression_report
results = run_glue.main(sys.argv[2:])
dist = torch.distributed.is_initialized()
rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
state = {k: v.detach().clone() for k, v in final["model"].state_dict().items()}
torch.save({"world_size": world, "steps": steps, "results": results, "state_dict": state},
           os.path.join(out, f"rank{rank}.pt"))
'''

BROADCAST_WORKER = r'''
"""Ranks with different weights and gradients: with the broadcast they all drop rank 0's rows."""
import argparse
import os
import sys

import torch
from torch import nn

import losparse.distributed
import utils

out = sys.argv[1]
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
parser = argparse.ArgumentParser()
utils.add_losparse_args(parser)
args = parser.parse_args(["--final_threshold", "0.5", "--warmup_steps", "1", "--initial_warmup", "1",
                          "--final_warmup", "2", "--deltaT", "1"])
saved = {}
for mode in ("broadcast", "local"):
    if mode == "local":
        losparse.distributed.broadcast_from_rank0 = lambda t: t  # what each rank would pick on its own
    torch.manual_seed(rank)  # different weights, data and gradients on each rank
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
    utils.substitute_layer_weights(model, ["0", "2"], [], parameter_ratio=0.2)
    pruner = utils.Pruner(model, args, total_step=6)
    for step in range(6):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        pruner.update_and_pruning(model, step)
        model.zero_grad()
    saved[mode] = {n: (p == 0).all(dim=1) for n, p in model.named_parameters() if n.endswith("sparse.weight")}
torch.save(saved, os.path.join(out, f"rank{rank}.pt"))
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
    """``python script out args`` in one process, or under ``torch.distributed.run`` (a free port) in ``nproc``."""
    out.mkdir(parents=True, exist_ok=True)
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [sys.executable, *launcher, str(script), str(out), *[str(a) for a in args]]
    proc = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def _write_csv(path, n, rng):
    pos, neg = ["good", "great", "fine", "love"], ["bad", "terrible", "awful", "hate"]
    filler = ["the", "a", "movie", "film", "cat", "dog", "was", "is", "it", "this", "day", "night", "city"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        for i in range(n):
            words = [rng.choice(filler) for _ in range(rng.randint(3, 8))]
            words.insert(rng.randrange(len(words) + 1), rng.choice(pos if i % 2 else neg))
            w.writerow([" ".join(words), i % 2])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    # Dropout off: with it, 1 x 8 and 2 x 4 would draw different masks for the same examples.
    cfg = tiny_config("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    _write_csv(root / "train.csv", 64, rng)  # a multiple of every global batch: no short or padded batch
    _write_csv(root / "validation.csv", 16, rng)
    (root / "worker.py").write_text(WORKER)
    (root / "broadcast_worker.py").write_text(BROADCAST_WORKER)
    return root


@pytest.fixture(scope="module")
def runs(assets):
    cache = {}

    def get(name):
        if name not in cache:
            nproc, batch, accum = RUNS[name]
            out = assets / name
            args = ["--model_name_or_path", assets / "model", "--train_file", assets / "train.csv",
                    "--validation_file", assets / "validation.csv", *TRAIN, "--per_device_train_batch_size", batch,
                    "--gradient_accumulation_steps", accum, "--output_dir", out / "output"]
            cache[name] = (out, _launch(assets, assets / "worker.py", nproc, out, args))
        return cache[name]

    return get


def _zero_rows(state_dict):
    return {k: (v == 0).all(dim=1) for k, v in state_dict.items() if k.endswith("sparse.weight")}


# ----------------------------------------------------------------------------------------------------
# Ranks agree, and agree with one process
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ddp", "ddp_accum"])
def test_ranks_have_identical_scores_masks_and_weights(runs, name):
    out, (r0, r1) = runs(name)
    assert r0["world_size"] == r1["world_size"] == 2  # a real 2-process run, not two single ones
    # STEP 3 ran once per optimizer step (not per micro-batch), at the same steps on both ranks.
    assert [s["step"] for s in r0["steps"]] == [s["step"] for s in r1["steps"]] == list(range(STEPS))
    masked_steps = 0
    for a, b in zip(r0["steps"], r1["steps"]):
        assert (a["threshold"], a["mask_threshold"]) == (b["threshold"], b["mask_threshold"]), a["step"]
        assert a["zero_rows"].keys() == b["zero_rows"].keys() and len(a["zero_rows"]) == 12
        assert not any(n.startswith("module.") for n in a["zero_rows"])  # the DDP prefix is stripped
        for n in a["zero_rows"]:
            assert torch.equal(a["zero_rows"][n], b["zero_rows"][n]), (a["step"], n)
            assert torch.equal(a["scores"][n], b["scores"][n]), (a["step"], n)
        masked_steps += a["mask_threshold"] is not None
    assert masked_steps == 13  # every other step from 6 to 14, then every step from 16 on

    sd0, sd1 = r0["state_dict"], r1["state_dict"]
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    zero = _zero_rows(sd0)
    assert len(zero) == 12 and 0 < sum(int(z.sum()) for z in zero.values())

    # The main process saved that model (unwrapped: no `module.` keys) and the results, once.
    saved = torch.load(out / "output" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in saved)
    assert {k for k in saved if k.endswith("sparse.weight")} == set(zero)
    for k in saved.keys() & sd0.keys():
        assert torch.equal(saved[k], sd0[k]), k
    timeless = [{k: v for k, v in r.items() if k != "train_runtime_s"}
                for r in (json.loads((out / "output" / "all_results.json").read_text()), r0["results"], r1["results"])]
    assert timeless[0] == timeless[1] == timeless[2]


@pytest.mark.parametrize("name", ["ddp", "ddp_accum"])
def test_two_processes_match_one_with_the_same_global_batch(runs, name):
    _, (single,) = runs("single")
    _, (multi, _) = runs(name)
    assert [s["step"] for s in multi["steps"]] == [s["step"] for s in single["steps"]]
    for a, b in zip(multi["steps"], single["steps"]):
        assert a["threshold"] == b["threshold"]  # the schedule counts optimizer steps
        assert (a["mask_threshold"] is None) == (b["mask_threshold"] is None)
        if a["mask_threshold"] is not None:
            assert a["mask_threshold"] == pytest.approx(b["mask_threshold"], rel=1e-4)
        for n in a["zero_rows"]:
            assert torch.equal(a["zero_rows"][n], b["zero_rows"][n]), (a["step"], n)
    for k, w in single["state_dict"].items():
        diff = (multi["state_dict"][k] - w).abs().max().item()
        assert diff <= (KEY_BIAS_ATOL if k.endswith("key.bias") else WEIGHT_ATOL), (k, diff)
    assert multi["results"]["effective_ratio"] == single["results"]["effective_ratio"]
    for k in ("eval_accuracy", "eval_f1"):  # 16 validation examples: at most one prediction may flip
        assert multi["results"][k] == pytest.approx(single["results"][k], abs=1 / 16 + 1e-9), k


def test_compacted_model_with_empty_layers_trains_under_ddp(assets, runs):
    """--stored_model_path compacts S; a layer without rows keeps an empty, unused parameter, which DDP rejects
    unless it is frozen."""
    out, (r0, _) = runs("ddp")
    stored = out / "output" / "pytorch_model.bin"
    empty = [n for n, z in _zero_rows(r0["state_dict"]).items() if z.all()]
    assert empty  # 24 steps at 20 % leave some layers without any row of S
    args = ["--model_name_or_path", assets / "model", "--train_file", assets / "train.csv",
            "--validation_file", assets / "validation.csv", "--max_train_steps", 4, "--seed", 3,
            "--per_device_train_batch_size", 4, "--low_rank_parameter_ratio", 0.1875,
            "--stored_model_path", stored, "--output_dir", assets / "stored" / "output"]
    a, b = _launch(assets, assets / "worker.py", 2, assets / "stored", args)
    assert a["world_size"] == 2 and a["steps"] == []  # no pruning of a stored model
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for n in empty:
        assert a["state_dict"][n.replace("sparse.weight", "sparse_weight_pruned")].shape[0] == 0


def test_broadcast_makes_ranks_use_rank0_masks(assets, tmp_path):
    r0, r1 = _launch(assets, assets / "broadcast_worker.py", 2, tmp_path, [])
    names = list(r0["broadcast"])
    assert len(names) == 2
    assert any(not torch.equal(r0["local"][n], r1["local"][n]) for n in names)  # on their own they would differ
    for n in names:
        assert torch.equal(r0["broadcast"][n], r0["local"][n]), n  # rank 0's choice ...
        assert torch.equal(r1["broadcast"][n], r0["local"][n]), n  # ... is everyone's
        assert 0 < int(r0["broadcast"][n].sum()) < r0["broadcast"][n].numel()


# ----------------------------------------------------------------------------------------------------
# Evaluation of run_qa.py / run_summarization.py on 2 processes: every example once, as on one process
# ----------------------------------------------------------------------------------------------------
def _run_procs(root, script, nproc, args, env=None):
    """``script args`` on one process, or under ``torch.distributed.run`` on ``nproc`` (gloo, ACCELERATE_USE_CPU)."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [sys.executable, *launcher, str(REPO / script), *[str(a) for a in args]]
    return subprocess.run(cmd, cwd=root, env=env or _env(root), capture_output=True, text=True, timeout=300)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def test_qa_evaluation_gathers_all_processes(tmp_path):
    """Evaluation only (STEP 1 substitutes the layers) of 23 questions split into windows, batch 5 per process: the
    last global batch is uneven, so the gather must drop the padding duplicates and keep the order of the features."""
    from conftest import save_tiny_model
    from test_run_qa import make_squad

    model = save_tiny_model(tmp_path / "model", "bert", "qa")
    dev = make_squad(tmp_path / "dev.json", 23, 1)
    args = ["--model_name_or_path", model, "--validation_file", dev, "--max_seq_length", 32, "--doc_stride", 8,
            "--num_train_epochs", 0, "--per_device_eval_batch_size", 5, "--low_rank_parameter_ratio", 0.2]
    logs = {n: _ok(_run_procs(tmp_path, "run_qa.py", n, args + ["--output_dir", tmp_path / f"p{n}"])) for n in (1, 2)}
    assert "Num processes: 2" in logs[2] and "DistributedType.MULTI_CPU" in logs[2]
    n_features = int(re.search(r"Num examples = 23 \((\d+) features\)", logs[1]).group(1))
    assert n_features > 23 and n_features % 10 != 0  # windows; a short last global batch
    one, two = (json.loads((tmp_path / f"p{n}" / "predictions.json").read_text()) for n in (1, 2))
    assert list(two) == list(one) == [r["id"] for r in json.loads(dev.read_text())["data"]]
    assert two == one
    nbest1, nbest2 = (json.loads((tmp_path / f"p{n}" / "nbest_predictions.json").read_text()) for n in (1, 2))
    for q in nbest1:
        assert [c["text"] for c in nbest2[q]] == [c["text"] for c in nbest1[q]], q
        for a, b in zip(nbest1[q], nbest2[q]):
            assert b["start_logit"] == pytest.approx(a["start_logit"], abs=1e-4)
            assert b["end_logit"] == pytest.approx(a["end_logit"], abs=1e-4)
    r1, r2 = (json.loads((tmp_path / f"p{n}" / "all_results.json").read_text()) for n in (1, 2))
    for k in ("eval_exact_match", "eval_f1", "effective_ratio"):
        assert r2[k] == r1[k], k


def test_summarization_evaluation_gathers_all_processes(tmp_path):
    """13 texts, batch 4 per process (the last global batch has 5 of 8): 13 summaries, in order, as on one process."""
    from conftest import save_tiny_model
    from test_run_summarization import make_copy_task

    model = save_tiny_model(tmp_path / "model", "bart", "seq2seq")
    dev = make_copy_task(tmp_path / "dev.json", 13, 1)
    args = ["--model_name_or_path", model, "--validation_file", dev, "--text_column", "text", "--summary_column",
            "summary", "--max_source_length", 64, "--val_max_target_length", 12, "--num_beams", 2,
            "--num_train_epochs", 0, "--per_device_eval_batch_size", 4, "--low_rank_parameter_ratio", 0.2]
    logs = {n: _ok(_run_procs(tmp_path, "run_summarization.py", n, args + ["--output_dir", tmp_path / f"p{n}"]))
            for n in (1, 2)}
    assert "Num processes: 2" in logs[2]
    one, two = ((tmp_path / f"p{n}" / "generated_predictions.txt").read_text().split("\n")[:-1] for n in (1, 2))
    assert len(one) == 13 and two == one
    r1, r2 = (json.loads((tmp_path / f"p{n}" / "all_results.json").read_text()) for n in (1, 2))
    assert r1["eval_samples"] == r2["eval_samples"] == 13
    for k in ("eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_gen_len", "effective_ratio"):
        assert r2[k] == pytest.approx(r1[k], abs=1e-9), k


def test_lone_processes_under_torchrun_stop_with_a_message(tmp_path, script="run_glue.py"):
    """torchrun without ACCELERATE_USE_CPU on a machine without GPUs: Accelerate runs each process alone. The script
    stops before loading the (here missing) model and before creating --output_dir. (One script: the three call the
    same check at the same place, see test_sharded_modes_stop_before_loading_the_model.)"""
    data = tmp_path / "data.json"
    data.write_text('{"data": []}')
    env = _env(tmp_path)
    env.pop("ACCELERATE_USE_CPU")
    proc = _run_procs(tmp_path, script, 2, ["--model_name_or_path", tmp_path / "no_such_model", "--train_file", data,
                                            "--validation_file", data, "--output_dir", tmp_path / "out"], env=env)
    assert proc.returncode != 0
    assert proc.stderr.count(f"{script}: error: WORLD_SIZE=2 but accelerate runs this process alone") == 2
    assert "no_such_model" not in proc.stderr  # nothing tried to load it
    # the start-up path check may create --output_dir (it proves it writable), but nothing is written into it
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------------------------------
# Sharded modes: refused at start-up, before any model is loaded, by all three scripts
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["DEEPSPEED", "FSDP", "MEGATRON_LM"])
@pytest.mark.parametrize("script", ["run_glue", "run_qa", "run_summarization"])
def test_sharded_modes_stop_before_loading_the_model(tmp_path, monkeypatch, script, mode):
    """The Accelerator reports ``mode`` (these modes need GPUs and their packages to start for real); the model path
    does not exist, so the LoSparse message, not a loading error, shows that the check comes first."""
    import importlib

    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    module = importlib.import_module(script)

    class Sharded(Accelerator):
        distributed_type = property(lambda self: DistributedType(mode))

    def make_accelerator(*args, **kwargs):
        accelerator = Accelerator(*args, **kwargs)
        accelerator.__class__ = Sharded
        return accelerator

    monkeypatch.setattr(module, "Accelerator", make_accelerator)
    data = tmp_path / "data.json"
    data.write_text('{"sentence1": "a b", "sentence2": "c", "label": 0, "question": "a", "context": "a b", '
                    '"answers": {"text": ["a"], "answer_start": [0]}, "text": "a b", "summary": "a"}\n')
    argv = ["--model_name_or_path", str(tmp_path / "no_such_model"), "--train_file", str(data),
            "--validation_file", str(data), "--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises((SystemExit, RuntimeError)) as e:
        module.main(argv) if script == "run_glue" else module.main()
    message = str(e.value)
    assert f"distributed_type={mode}" in message and "Supported: a single process" in message
    assert "--multi_gpu" in message and "no_such_model" not in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("shard", ["ds_id", "_is_sharded", "FlatParameter", "DTensor"])
def test_pruner_refuses_sharded_parameters(shard):
    """A DeepSpeed ZeRO-3 (``ds_id``) or FSDP (``FlatParameter``, ``DTensor``, ``_is_sharded``) parameter: the Pruner
    stops when it is built instead of scoring a shard, also when used without the scripts."""
    import argparse

    from torch import nn

    import utils

    model = nn.Sequential(nn.Linear(8, 8))
    utils.substitute_layer_weights(model, ["0"], [], parameter_ratio=0.3)
    layer = model[0]
    if shard.startswith(("ds_", "_")):
        setattr(layer.sparse.weight, shard, True)
    else:
        layer.sparse.weight = type(shard, (nn.Parameter,), {})(layer.sparse.weight.detach())
    parser = argparse.ArgumentParser()
    utils.add_losparse_args(parser)
    args = parser.parse_args(["--warmup_steps", "1"])
    with pytest.raises(RuntimeError, match=r"'0\.sparse\.weight' is sharded .*single process or DDP"):
        utils.Pruner(model, args, total_step=20)
