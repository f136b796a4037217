"""run_glue.py end to end on CPU, offline: tiny BERT / DeBERTa-v2 on small local csv/json files.

A table of runs (single sentence, sentence pair, regression; BERT and DeBERTa-v2; bf16 once) trained until the
schedule reaches ``--final_threshold``; eval-only of each checkpoint just written; a checkpoint in the original
layout at another rank; checkpoints that do not fit; knowledge distillation of a pruned model; exact resume;
the full fine-tuning baseline; usage errors; the metric and distillation-loss helpers.
"""
import csv
import json
import math
import random
import re

import numpy as np
import pytest
import torch

from conftest import REPO, losparse_layers_from_state_dict, losparse_ratios, run_script, save_tiny_model

import run_glue
import utils
from run_glue import ALLOW_NAME, BLOCK_NAME

# One thread per run: the CI machine has 2 cores shared by several processes.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
LOW_RANK, FINAL = 0.1875, 0.2  # 0.1875 gives whole ranks for 32x32 (3), 64x32 and 32x64 (4) matrices
STEPS = 40
LOSPARSE = ["--low_rank_parameter_ratio", LOW_RANK, "--final_threshold", FINAL, "--warmup_steps", 4,
            "--initial_warmup", 1, "--final_warmup", 3, "--deltaT", 5]
TRAIN = ["--max_train_steps", STEPS, "--learning_rate", 1e-2, "--num_warmup_steps", 4, "--seed", 3,
         "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 16]

POS = ["good", "great", "fine", "love"]
NEG = ["bad", "terrible", "awful", "hate"]
FILLER = ["the", "a", "movie", "film", "cat", "dog", "was", "is", "it", "this", "day", "night", "city", "river"]
PAIR_LABELS = ["contradiction", "entailment", "neutral"]

# name -> (model kind, data kind, extra flags)
CASES = {
    "bert-single": ("bert", "single", []),
    "bert-pair": ("bert", "pair", []),
    "bert-regression": ("bert", "regression", []),
    "deberta-single-bf16": ("deberta", "single", ["--mixed_precision", "bf16"]),
    "deberta-pair": ("deberta", "pair", []),
    "deberta-stsb": ("deberta", "regression", ["--task_name", "stsb"]),  # a GLUE task from local files
}
METRICS = {"single": {"eval_accuracy", "eval_f1"}, "pair": {"eval_accuracy"},
           "regression": {"eval_pearson", "eval_spearmanr"}}
NUM_LABELS = {"single": 2, "pair": 3, "regression": 1}
RESULT_KEYS = {"effective_ratio", "model_params", "dense_equivalent_params", "train_runtime_s", "train_steps"}
EVAL_LINE = re.compile(r"step (\d+): eval \{.*\} \| threshold (\S+) \| effective ratio ([\d.]+)")


def _sentence(rng, label=None):
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
    if label is not None:
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if label else NEG))
    return " ".join(words)


def _write_data(root):
    """single (csv, int labels), pair (jsonl, string labels), regression (csv, float labels)."""
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 56), ("validation", 24)):
        path = root / f"single_{split}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence", "label"])
            for i in range(n):
                w.writerow([_sentence(rng, i % 2), i % 2])
        files["single", split] = path

        path = root / f"pair_{split}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"sentence1": _sentence(rng, 1), "sentence2": _sentence(rng, i % 2),
                                    "label": PAIR_LABELS[i % 3]}) + "\n")
        files["pair", split] = path

        path = root / f"regression_{split}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence1", "sentence2", "label"])
            for i in range(n):
                s1, s2 = _sentence(rng, i % 2), _sentence(rng, (i // 2) % 2)
                score = sum(word in POS for word in (s1 + " " + s2).split()) * 2.0 + rng.random()
                w.writerow([s1, s2, round(score, 3)])
        files["regression", split] = path
    return files


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    models = {(kind, n): save_tiny_model(root / f"{kind}-{n}", kind, "seq_cls", n)
              for kind in ("bert", "deberta") for n in (1, 2, 3)}
    return {"root": root, "models": models, "files": _write_data(root),
            "env": dict(ENV, HF_DATASETS_CACHE=str(root / "hf_datasets"))}


def _data_args(assets, data, train=True):
    files = assets["files"]
    args = ["--validation_file", files[data, "validation"]]
    if train:
        args += ["--train_file", files[data, "train"]]
    return args


def _run(assets, args):
    return run_script("run_glue.py", args, extra_env=assets["env"])


def _check_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def _results(out):
    return json.loads((out / "all_results.json").read_text())


@pytest.fixture(scope="module")
def runs(assets):
    """Lazily trained runs of the CASES table, shared by the tests of this module."""
    cache = {}

    def get(name):
        if name not in cache:
            kind, data, extra = CASES[name]
            out = assets["root"] / f"run-{name}"
            args = ["--model_name_or_path", assets["models"][kind, NUM_LABELS[data]], *_data_args(assets, data),
                    *TRAIN, *LOSPARSE, *extra, "--output_dir", out]
            proc = _run(assets, args)
            _check_ok(proc)
            cache[name] = (out, proc)
        return cache[name]

    return get


_layers_from_state_dict, _ratios = losparse_layers_from_state_dict, losparse_ratios


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------
# Training end to end, and eval-only of what it wrote
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_train_reaches_final_threshold(runs, name):
    out, proc = runs(name)
    kind, data, extra = CASES[name]
    for f in ("config.json", "model.safetensors", "tokenizer_config.json", "pytorch_model.bin", "all_results.json",
              "compact/losparse_model.safetensors"):
        assert (out / f).is_file(), f
    res = _results(out)
    assert set(res) == METRICS[data] | RESULT_KEYS
    assert res["train_steps"] == STEPS and res["train_runtime_s"] > 0
    assert all(math.isfinite(res[k]) for k in METRICS[data])
    assert res["model_params"] < res["dense_equivalent_params"]

    sd = _load(out / "pytorch_model.bin")
    layers = _layers_from_state_dict(sd)
    assert len(layers) == 12  # 2 layers x (q, k, v, attention output, intermediate, output)
    if kind == "deberta":  # the original QA/summarization lists missed these
        for proj in ("query_proj", "key_proj", "value_proj"):
            assert f"deberta.encoder.layer.0.attention.self.{proj}.left.weight" in sd
    low, sparse, tol = _ratios(layers)
    assert low == pytest.approx(LOW_RANK, abs=1e-12)
    assert res["effective_ratio"] == pytest.approx(low + sparse, abs=1e-12)
    assert abs(res["effective_ratio"] - (LOW_RANK + FINAL)) <= tol, (res["effective_ratio"], tol)
    assert sparse > 0

    # Every evaluation logs the threshold and the effective ratio; the last one the final values.
    evals = EVAL_LINE.findall(proc.stderr)
    assert len(evals) >= 5  # one per epoch (7 batches, 40 steps)
    step, threshold, ratio = evals[-1]
    assert int(step) == STEPS and float(threshold) == pytest.approx(FINAL)
    assert float(ratio) == pytest.approx(res["effective_ratio"], abs=1e-4)
    thresholds = [float(t) for _, t, _ in evals]
    assert thresholds == sorted(thresholds, reverse=True) and thresholds[0] > FINAL + 0.1  # the cubic schedule
    assert "LoSparse compression report" in proc.stderr and "substituted matrices: 12" in proc.stderr
    if "--mixed_precision" in extra:
        assert "Mixed precision type: bf16" in proc.stderr
    if data == "pair":  # string labels, sorted
        assert json.loads((out / "config.json").read_text())["id2label"] == {str(i): l for i, l in enumerate(PAIR_LABELS)}
    if data == "single":  # the pruned model still learns the (easy) task
        assert res["eval_accuracy"] >= 0.75


@pytest.mark.parametrize("name", list(CASES))
def test_eval_only_reproduces_last_eval(assets, runs, name):
    out, _ = runs(name)
    kind, data, extra = CASES[name]
    ev = assets["root"] / f"eval-{name}"
    # No --train_file: labels come from the validation file. The default --low_rank_parameter_ratio differs from
    # the trained one; the ranks are read from the checkpoint.
    proc = _run(assets, ["--model_name_or_path", assets["models"][kind, NUM_LABELS[data]],
                         *_data_args(assets, data, train=False), *extra, "--per_device_eval_batch_size", 16,
                         "--num_train_epochs", 0, "--eval_checkpoint", out / "pytorch_model.bin", "--output_dir", ev])
    _check_ok(proc)
    trained, evaluated = _results(out), _results(ev)
    for k in METRICS[data]:
        assert evaluated[k] == pytest.approx(trained[k], abs=1e-6), k
    assert evaluated["effective_ratio"] == trained["effective_ratio"]
    assert evaluated["model_params"] == trained["model_params"]
    assert evaluated["train_steps"] == 0
    assert not (ev / "pytorch_model.bin").exists()  # evaluation only writes the results
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == evaluated  # and prints them


def _predict(model_dir, path, model):
    """Regression predictions of ``model`` on a local csv, in-process."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = list(csv.DictReader(open(path)))
    enc = tok([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True, truncation=True,
              max_length=128, return_tensors="pt")
    with torch.no_grad():
        preds = model.eval()(**enc).logits.squeeze(-1).numpy()
    return preds, np.array([float(r["label"]) for r in rows])


def test_original_layout_checkpoint_at_another_rank(assets, tmp_path):
    from scipy.stats import pearsonr, spearmanr
    from transformers import AutoModelForSequenceClassification

    model_dir = assets["models"]["bert", 1]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    replaced = utils.substitute_layer_weights(model, ALLOW_NAME, BLOCK_NAME, parameter_ratio=0.2)
    assert {r["rank"] for r in replaced} == {4, 5}  # not what 0.05 (the run's default) gives: 1 and 2
    for m in model.modules():  # a pruned S, as in a released checkpoint: keep 5 random rows per matrix
        if isinstance(m, utils.LinearLoSparse):
            keep = torch.randperm(m.out_feature)[:5]
            mask = torch.zeros(m.out_feature, 1)
            mask[keep] = 1
            m.sparse.weight.data.mul_(mask)
    ckpt = tmp_path / "other_rank.bin"
    torch.save(model.state_dict(), ckpt)  # exactly what the original scripts wrote
    preds, labels = _predict(model_dir, assets["files"]["regression", "validation"], model)

    out = tmp_path / "eval"
    proc = _run(assets, ["--model_name_or_path", model_dir, *_data_args(assets, "regression", train=False),
                         "--num_train_epochs", 0, "--eval_checkpoint", ckpt, "--output_dir", out])
    _check_ok(proc)
    res = _results(out)
    assert res["eval_pearson"] == pytest.approx(pearsonr(preds, labels)[0], abs=1e-5)
    assert res["eval_spearmanr"] == pytest.approx(spearmanr(preds, labels)[0], abs=1e-5)
    low, sparse, _ = _ratios(_layers_from_state_dict(model.state_dict()))
    assert res["effective_ratio"] == pytest.approx(low + sparse, abs=1e-12)


@pytest.mark.parametrize("case", ["wrong_head", "wrong_base_model"])
def test_checkpoint_that_does_not_fit_names_the_keys(assets, runs, case):
    if case == "wrong_head":  # a 3-label checkpoint on a binary task
        ckpt, expected = runs("bert-pair")[0] / "pytorch_model.bin", ["classifier.weight", "shape mismatch"]
    else:  # a DeBERTa checkpoint into BERT
        ckpt, expected = runs("deberta-pair")[0] / "pytorch_model.bin", ["missing keys", "unexpected keys",
                                                                          "deberta.encoder"]
    proc = _run(assets, ["--model_name_or_path", assets["models"]["bert", 2],
                         *_data_args(assets, "single", train=False), "--num_train_epochs", 0,
                         "--eval_checkpoint", ckpt])
    assert proc.returncode != 0
    assert "--eval_checkpoint" in proc.stderr and "does not fit" in proc.stderr
    for word in expected:
        assert word in proc.stderr, word
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------
# Full fine-tuning baseline, distillation
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(assets):
    out = assets["root"] / "baseline"
    proc = _run(assets, ["--model_name_or_path", assets["models"]["bert", 2], *_data_args(assets, "single"),
                         *TRAIN, "--learning_rate", 1e-3, "--no_losparse", "--output_dir", out])
    _check_ok(proc)
    return out, proc


def test_no_losparse_baseline(baseline):
    out, proc = baseline
    res = _results(out)
    assert set(res) == METRICS["single"] | RESULT_KEYS
    assert res["effective_ratio"] == 1.0 and res["model_params"] == res["dense_equivalent_params"]
    assert res["train_steps"] == STEPS
    sd = _load(out / "pytorch_model.bin")
    assert not any("left.weight" in k or "sparse" in k for k in sd)
    assert "bert.encoder.layer.0.attention.self.query.weight" in sd
    assert not (out / "compact").exists()
    evals = EVAL_LINE.findall(proc.stderr)
    assert evals and all(thr == "n/a" for _, thr, _ in evals)


def _state_logits(model_dir, state_dict_path, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    utils.substitute_layer_weights(model, ALLOW_NAME, BLOCK_NAME, parameter_ratio=0.05, do_svd=False)
    utils.load_checkpoint(model, state_dict_path)
    enc = AutoTokenizer.from_pretrained(model_dir)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**enc).logits


def test_distillation_from_stored_pruned_model(assets, runs, baseline, tmp_path):
    stored_dir, _ = runs("bert-single")
    stored = stored_dir / "pytorch_model.bin"
    teacher_dir, _ = baseline
    out = tmp_path / "kd"
    proc = _run(assets, ["--model_name_or_path", assets["models"]["bert", 2], *_data_args(assets, "single"),
                         "--max_train_steps", 14, "--learning_rate", 1e-3, "--seed", 5,
                         "--stored_model_path", stored, "--teacher_path", teacher_dir,
                         "--alpha_output", 1.0, "--alpha_layer", 1.0, "--temperature", 2.0, "--output_dir", out])
    _check_ok(proc)
    res = _results(out)
    kd_keys = {"train_task_loss", "train_kd_output_loss", "train_kd_layer_loss"}
    assert set(res) == METRICS["single"] | RESULT_KEYS | kd_keys
    for k in kd_keys:
        assert math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    assert re.search(r"kd output loss \d+\.\d+ \| kd layer loss \d+\.\d+", proc.stderr)

    # No further pruning: the compacted layers keep exactly the nonzero rows of the stored model.
    before, after = _load(stored), _load(out / "pytorch_model.bin")
    n_layers = 0
    for k in before:
        if k.endswith(".sparse.weight"):
            p = k[: -len("sparse.weight")]
            rows = torch.nonzero((before[k] != 0).any(dim=1)).flatten()
            assert after[p + "sparse_weight_pruned"].shape == (rows.numel(), before[k].shape[1])
            assert torch.equal(after[p + "nonzero_idx"], rows)
            assert p + "sparse.weight" not in after
            n_layers += 1
    assert n_layers == 12
    assert sum(v.shape[0] for k, v in after.items() if k.endswith("sparse_weight_pruned")) > 0
    assert res["effective_ratio"] == pytest.approx(_results(stored_dir)["effective_ratio"], abs=1e-12)
    assert res["train_steps"] == 14

    # The student moved.
    texts = ["the movie was good", "a terrible day", "this cat is fine and the dog is awful"]
    s0 = _state_logits(assets["models"]["bert", 2], stored, texts)
    s1 = _state_logits(assets["models"]["bert", 2], out / "pytorch_model.bin", texts)
    assert (s0 - s1).abs().max() > 1e-4

    # A distilled (compacted) checkpoint evaluates.
    ev = tmp_path / "kd_eval"
    proc = _run(assets, ["--model_name_or_path", assets["models"]["bert", 2],
                         *_data_args(assets, "single", train=False), "--num_train_epochs", 0,
                         "--eval_checkpoint", out / "pytorch_model.bin", "--output_dir", ev])
    _check_ok(proc)
    for k in METRICS["single"] | {"effective_ratio"}:
        assert _results(ev)[k] == pytest.approx(res[k], abs=1e-6), k


DISTIL_DRIVER = r'''
"""run_glue.main(argv), recording at every distillation step the loss handed to Accelerator.backward and the one
written by hand from the student's and the teacher's outputs: values, and gradients w.r.t. the student's logits and
hidden states."""
import json
import os
import sys

import accelerate
import torch

import run_glue

alpha_output, alpha_layer, T = (float(os.environ[k]) for k in ("KD_ALPHA_OUTPUT", "KD_ALPHA_LAYER", "KD_T"))
seen, records = [], []
_losses, _backward = run_glue.distillation_losses, accelerate.Accelerator.backward


def distillation_losses(student, teacher, *args, **kwargs):
    seen.append((student, teacher))
    return _losses(student, teacher, *args, **kwargs)


def by_hand(student, teacher):
    s, t = student.logits.float(), teacher.logits.float()
    log_ps, log_pt = torch.log_softmax(s / T, dim=-1), torch.log_softmax(t / T, dim=-1)
    kd_out = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * T ** 2
    terms = {"task": student.loss, "output": alpha_output * kd_out}
    if alpha_layer > 0:
        assert len(student.hidden_states) == len(teacher.hidden_states) == 3  # embeddings + 2 layers
        terms["layer"] = alpha_layer * sum(((a.float() - b.float()) ** 2).mean()
                                           for a, b in zip(student.hidden_states, teacher.hidden_states))
    else:
        assert student.hidden_states is None
    return terms


def backward(self, loss, **kwargs):
    student, teacher = seen.pop()
    terms = by_hand(student, teacher)
    wrt = [student.logits] + list(student.hidden_states or ())
    grad = lambda y: torch.autograd.grad(y, wrt, retain_graph=True, allow_unused=True)  # noqa: E731
    flat = lambda gs: torch.cat([torch.zeros(0) if g is None else g.reshape(-1) for g in gs])  # noqa: E731
    g_loss, g_hand = flat(grad(loss)), flat(grad(sum(terms.values())))
    records.append({"loss": loss.item(), "hand": sum(terms.values()).item(),
                    "terms": {k: v.item() for k, v in terms.items()},
                    "grad_max_diff": (g_loss - g_hand).abs().max().item(), "grad_max": g_hand.abs().max().item(),
                    "term_grad_max": {k: flat(grad(v)).abs().max().item() for k, v in terms.items()}})
    return _backward(self, loss, **kwargs)


run_glue.distillation_losses, accelerate.Accelerator.backward = distillation_losses, backward
run_glue.main(sys.argv[1:])
with open(os.environ["KD_RECORD"], "w") as f:
    json.dump(records, f)
'''


@pytest.mark.parametrize("alpha_output, alpha_layer", [(0.7, 3.0), (2.0, 0.0)])
def test_distillation_loss_is_task_plus_weighted_kd_terms(assets, runs, tmp_path, alpha_output, alpha_layer):
    """The loss that is back-propagated equals task + alpha_output * kd_out + alpha_layer * kd_layer written by hand
    (value and gradient), with both KD terms large enough that dropping or mis-weighting one would show. The teacher
    is another random model with a scaled-up head: confident logits, other hidden states, so both KD terms are
    large."""
    from conftest import build_tiny_model, make_tokenizer

    teacher = build_tiny_model("bert", "seq_cls", 2, seed=7)
    with torch.no_grad():
        teacher.classifier.weight.mul_(200.0)
    teacher.save_pretrained(tmp_path / "teacher")
    make_tokenizer().save_pretrained(tmp_path / "teacher")
    driver = tmp_path / "kd_driver.py"
    driver.write_text(DISTIL_DRIVER)
    record = tmp_path / "record.json"
    env = dict(assets["env"], KD_ALPHA_OUTPUT=str(alpha_output), KD_ALPHA_LAYER=str(alpha_layer), KD_T="2.0",
               KD_RECORD=str(record))
    proc = run_script(str(driver), ["--model_name_or_path", assets["models"]["bert", 2],
                                    *_data_args(assets, "single"), "--max_train_steps", 3, "--learning_rate", 1e-3,
                                    "--seed", 5, "--stored_model_path", runs("bert-single")[0] / "pytorch_model.bin",
                                    "--teacher_path", tmp_path / "teacher", "--alpha_output", alpha_output,
                                    "--alpha_layer", alpha_layer, "--temperature", 2.0,
                                    "--output_dir", tmp_path / "kd"], extra_env=env)
    _check_ok(proc)
    steps = json.loads(record.read_text())
    assert len(steps) == 3
    expected_terms = {"task", "output"} | ({"layer"} if alpha_layer else set())
    for r in steps:
        assert set(r["terms"]) == expected_terms
        assert r["loss"] == pytest.approx(r["hand"], rel=1e-5, abs=1e-6)
        assert r["grad_max_diff"] <= 1e-5 * r["grad_max"] + 1e-9, r
        for k in expected_terms - {"task"}:  # each KD term moves the loss and its gradient far beyond the tolerance
            assert abs(r["terms"][k]) > 1e-3 * abs(r["hand"]) and r["term_grad_max"][k] > 1e-3 * r["grad_max"], (k, r)
    res = _results(tmp_path / "kd")  # the reported means are the unweighted terms
    assert res["train_kd_output_loss"] == pytest.approx(sum(r["terms"]["output"] for r in steps) / 3 / alpha_output,
                                                         rel=1e-5)
    if alpha_layer:
        assert res["train_kd_layer_loss"] == pytest.approx(sum(r["terms"]["layer"] for r in steps) / 3 / alpha_layer,
                                                            rel=1e-5)
    else:
        assert res["train_kd_layer_loss"] == 0.0


# ----------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------
# 56 examples / batch 8 = 7 batches per epoch, accumulation 2 -> 4 optimizer steps per epoch (the last one on a single
# batch). step_10 lies inside epoch 2, 4 batches in; step_12 is the end of epoch 2 (an evaluation follows it).
RESUME = ["--max_train_steps", 30, "--learning_rate", 1e-2, "--gradient_accumulation_steps", 2]


@pytest.fixture(scope="module")
def uninterrupted(assets):
    out = assets["root"] / "uninterrupted"
    proc = _run(assets, ["--model_name_or_path", assets["models"]["bert", 2], *_data_args(assets, "single"),
                         *LOSPARSE, *RESUME, "--seed", 1, "--checkpointing_steps", 2, "--output_dir", out])
    _check_ok(proc)
    return out


@pytest.mark.parametrize("resume_step, first_eval", [(10, 12), (12, 16)])
def test_resume_gives_the_same_final_masks(assets, uninterrupted, tmp_path, resume_step, first_eval):
    full, resumed = uninterrupted, tmp_path / "resumed"
    assert (full / f"step_{resume_step}" / "custom_checkpoint_1.pkl").is_file()  # the Pruner's state
    # Another --seed: the data order, RNG and weights must all come from the checkpoint.
    proc = _run(assets, ["--model_name_or_path", assets["models"]["bert", 2], *_data_args(assets, "single"),
                         *LOSPARSE, *RESUME, "--seed", 2, "--resume_from_checkpoint", full / f"step_{resume_step}",
                         "--output_dir", resumed])
    _check_ok(proc)
    assert "Resumed from checkpoint" in proc.stdout
    assert int(EVAL_LINE.findall(proc.stderr)[0][0]) == first_eval  # nothing before the checkpoint was re-run
    assert _results(resumed)["train_steps"] == 30

    a, b = _load(full / "pytorch_model.bin"), _load(resumed / "pytorch_model.bin")
    assert a.keys() == b.keys()
    sparse_keys = [k for k in a if k.endswith("sparse.weight")]
    assert len(sparse_keys) == 12
    for k in sparse_keys:
        assert torch.equal(a[k] == 0, b[k] == 0), f"mask of {k} differs"
    assert any((a[k] == 0).all(dim=1).any() for k in sparse_keys)  # there are pruned rows to compare
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
    assert _results(full)["effective_ratio"] == _results(resumed)["effective_ratio"]


def test_latest_checkpoint(tmp_path):
    import os
    import time

    for i, name in enumerate(["step_4", "epoch_0", "step_12", "notes", "step_x", "step_16"]):
        (tmp_path / name).mkdir()
        if name != "step_16":  # complete folders carry the marker save_state_atomic writes last
            (tmp_path / name / utils.CHECKPOINT_MARKER).write_text('{"files": {}}')
            os.utime(tmp_path / name / utils.CHECKPOINT_MARKER, (time.time() + i, time.time() + i))
    assert run_glue._latest_checkpoint(str(tmp_path)).endswith("step_12")  # step_16 is incomplete
    assert run_glue._latest_checkpoint(str(tmp_path / "notes")) is None  # nothing yet: start from scratch
    assert run_glue._latest_checkpoint(str(tmp_path / "missing")) is None


def test_mnli_hub_layout_matched_and_mismatched(assets, tmp_path, monkeypatch):
    """--task_name mnli alone loads nyu-mll/glue: ClassLabel names, validation_matched/_mismatched, unlabelled
    test splits. The Hub is faked (offline) with a DatasetDict of that layout; main() runs in-process."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    names = ["entailment", "neutral", "contradiction"]
    features = Features({"premise": Value("string"), "hypothesis": Value("string"),
                         "label": ClassLabel(names=names), "idx": Value("int32")})
    rng = random.Random(1)

    def split(n, labelled=True):
        return Dataset.from_dict({"premise": [_sentence(rng, 1) for _ in range(n)],
                                  "hypothesis": [_sentence(rng, i % 2) for i in range(n)],
                                  "label": [i % 3 if labelled else -1 for i in range(n)],
                                  "idx": list(range(n))}, features=features)

    fake = DatasetDict({"train": split(24), "validation_matched": split(9), "validation_mismatched": split(12),
                        "test_matched": split(5, False), "test_mismatched": split(5, False)})
    calls = []
    monkeypatch.setattr(run_glue, "load_dataset", lambda *a, **k: calls.append(a) or fake)
    out = tmp_path / "mnli"
    results = run_glue.main(["--model_name_or_path", str(assets["models"]["bert", 3]), "--task_name", "mnli",
                             "--max_train_steps", "12", "--seed", "0", "--learning_rate", "1e-3",
                             "--low_rank_parameter_ratio", str(LOW_RANK), "--final_threshold", "0.3",
                             "--warmup_steps", "2", "--initial_warmup", "1", "--final_warmup", "2",
                             "--output_dir", str(out)])
    assert calls == [(run_glue.GLUE_HUB_ID, "mnli")]
    assert set(results) == {"eval_accuracy", "eval_accuracy_mm"} | RESULT_KEYS
    assert results == _results(out)
    # 9 matched / 12 mismatched examples: the accuracies are multiples of 1/9 and 1/12.
    assert round(results["eval_accuracy"] * 9, 6).is_integer() and round(results["eval_accuracy_mm"] * 12, 6).is_integer()
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}
    low, sparse, tol = _ratios(_layers_from_state_dict(_load(out / "pytorch_model.bin")))
    assert abs(results["effective_ratio"] - (LOW_RANK + 0.3)) <= tol


# ----------------------------------------------------------------------------------------------------
# Usage errors: exit 2, name the flag, before any model is loaded
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (["--final_threshold", "1.5"], ["--final_threshold"]),
    (["--task_name", "glue_foo"], ["--task_name", "mnli", "stsb", "cola"]),
    ([], ["--train_file"]),
])
def test_bad_flags_exit_before_loading(assets, flags, expected):
    args = ["--model_name_or_path", assets["root"] / "no_such_model", *flags]
    if "--task_name" not in flags:
        args += ["--validation_file", assets["files"]["single", "validation"]]
        if flags:
            args += ["--train_file", assets["files"]["single", "train"]]
    proc = _run(assets, args)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr
    for word in expected:
        assert word in proc.stderr, word
    assert "no_such_model" not in proc.stderr  # nothing tried to load the (missing) model


@pytest.mark.parametrize("flags, expected", [
    (["--train_file", "x.txt", "--validation_file", "y.csv"], "--train_file should be a csv or a json file"),
    (["--train_file", "{train}", "--validation_file", "{pair_val}"], "same format"),
    (["--train_file", "{train}"], "--validation_file is required"),
    (["--train_file", "{train}", "--validation_file", "{val}", "--teacher_path", "t"], "--teacher_path needs "
                                                                                         "--stored_model_path"),
    (["--train_file", "{train}", "--validation_file", "{val}", "--eval_checkpoint", "{val}"], "--num_train_epochs 0"),
    (["--train_file", "{train}", "--validation_file", "{val}", "--checkpointing_steps", "often"],
     "--checkpointing_steps"),
    (["--train_file", "{train}", "--validation_file", "{val}", "--alpha_layer", "-1"], "--alpha_layer"),
    (["--train_file", "{train}", "--validation_file", "{val}", "--low_rank_parameter_ratio", "0"],
     "--low_rank_parameter_ratio"),
    (["--train_file", "{train}", "--validation_file", "{val}", "--structured_method", "median"],
     "--structured_method"),
    (["--train_file", "{train}", "--validation_file", "{val}", "--no_losparse", "--stored_model_path", "{val}"],
     "--no_losparse"),
])
def test_parse_args_errors(assets, capsys, flags, expected):
    files = assets["files"]
    subst = {"{train}": str(files["single", "train"]), "{val}": str(files["single", "validation"]),
             "{pair_val}": str(files["pair", "validation"])}
    argv = ["--model_name_or_path", "m"] + [subst.get(f, f) for f in flags]
    with pytest.raises(SystemExit) as e:
        run_glue.parse_args(argv)
    assert e.value.code == 2
    assert expected in capsys.readouterr().err


def test_parse_args_accepts_eval_only_and_task_with_local_files(assets):
    files = assets["files"]
    args = run_glue.parse_args(["--model_name_or_path", "m", "--validation_file", str(files["single", "validation"]),
                                "--num_train_epochs", "0", "--eval_checkpoint", str(files["single", "validation"])])
    assert args.eval_checkpoint and args.train_file is None
    args = run_glue.parse_args(["--model_name_or_path", "m", "--task_name", "STSB",
                                "--train_file", str(files["regression", "train"]),
                                "--validation_file", str(files["regression", "validation"])])
    assert args.task_name == "stsb" and args.temperature == 2.0 and args.final_threshold == 0.1


# ----------------------------------------------------------------------------------------------------
# Shell scripts: the commands they run parse, with the original hyper-parameters
# ----------------------------------------------------------------------------------------------------
def _script_commands(script, tmp_path, *args, **env):
    import os
    import shlex
    import subprocess

    proc = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON="echo", **env), timeout=60)
    assert proc.returncode == 0, proc.stderr
    cmds = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("run_glue.py")]
    return [run_glue.parse_args(cmd[1:]) for cmd in cmds]


def test_train_glue_sh_is_the_original_mnli_command(tmp_path):
    (args,) = _script_commands("train_glue.sh", tmp_path)
    expected = {"task_name": "mnli", "model_name_or_path": "microsoft/deberta-v3-base", "warmup_steps": 675,
                "initial_threshold": 1.0, "final_threshold": 0.15, "initial_warmup": 1, "final_warmup": 5,
                "beta1": 0.85, "per_device_train_batch_size": 32, "learning_rate": 9e-5, "num_train_epochs": 8,
                "num_warmup_steps": 480, "low_rank_parameter_ratio": 0.05, "seed": 7, "gradient_accumulation_steps": 8}
    assert {k: getattr(args, k) for k in expected} == expected
    (args,) = _script_commands("train_glue.sh", tmp_path, "--seed", "3", FINAL_THRESHOLD="0.05")
    assert args.seed == 3 and args.final_threshold == 0.05


def test_train_glue_distil_sh(tmp_path):
    stored = tmp_path / "pytorch_model.bin"
    stored.write_bytes(b"")
    (args,) = _script_commands("train_glue_distil.sh", tmp_path, STORED_MODEL=str(stored))
    expected = {"task_name": "mnli", "model_name_or_path": "bert-base-uncased", "stored_model_path": str(stored),
                "teacher_path": "textattack/bert-base-uncased-MNLI", "per_device_train_batch_size": 32,
                "learning_rate": 9e-5, "alpha_output": 0.0, "alpha_layer": 15.0, "temperature": 2.0,
                "num_train_epochs": 50, "low_rank_parameter_ratio": 0.05, "seed": 7}
    assert {k: getattr(args, k) for k in expected} == expected


def test_eval_glue_sh(tmp_path):
    for name in ("deberta_mnli_20", "deberta_stsb_10", "bert_rte_15", "bert_mnli_50_distil"):
        (tmp_path / f"{name}.bin").write_bytes(b"")
    parsed = _script_commands("eval_glue.sh", tmp_path, "all", CKPT_DIR=str(tmp_path))
    got = {(a.model_name_or_path, a.task_name, a.eval_checkpoint.rsplit("/", 1)[-1], a.num_train_epochs)
           for a in parsed}
    assert got == {("microsoft/deberta-v3-base", "mnli", "deberta_mnli_20.bin", 0),
                   ("microsoft/deberta-v3-base", "stsb", "deberta_stsb_10.bin", 0),
                   ("bert-base-uncased", "rte", "bert_rte_15.bin", 0),
                   ("bert-base-uncased", "mnli", "bert_mnli_50_distil.bin", 0)}



def test_eval_glue_distil_sh(tmp_path):
    for name in ("bert_mnli_25_distil", "bert_rte_50_distil"):
        (tmp_path / f"{name}.bin").write_bytes(b"")
    (args,) = _script_commands("eval_glue_distil.sh", tmp_path, CKPT_DIR=str(tmp_path))
    assert (args.model_name_or_path, args.task_name, args.eval_checkpoint, args.num_train_epochs) == \
        ("bert-base-uncased", "mnli", str(tmp_path / "bert_mnli_25_distil.bin"), 0)
    (args,) = _script_commands("eval_glue_distil.sh", tmp_path, "bert_rte_50_distil", CKPT_DIR=str(tmp_path))
    assert (args.task_name, args.eval_checkpoint) == ("rte", str(tmp_path / "bert_rte_50_distil.bin"))
    import subprocess

    proc = subprocess.run(["bash", str(REPO / "eval_glue_distil.sh"), "deberta_mnli_20"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "not a distilled checkpoint" in proc.stderr

# ----------------------------------------------------------------------------------------------------
# Helpers: metrics and distillation losses
# ----------------------------------------------------------------------------------------------------
def test_compute_metrics_glue_definitions():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    refs, preds = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert run_glue.compute_metrics("cola", preds, refs, False, 2) == {
        "matthews_correlation": pytest.approx(matthews_corrcoef(refs, preds))}
    for task in ("mrpc", "qqp", None):
        m = run_glue.compute_metrics(task, preds, refs, False, 2)
        assert m == {"accuracy": pytest.approx((preds == refs).mean()), "f1": pytest.approx(f1_score(refs, preds))}
    for task in ("rte", "sst2", "qnli", "mnli", "wnli"):
        assert set(run_glue.compute_metrics(task, preds, refs, False, 2)) == {"accuracy"}
    refs3, preds3 = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    assert run_glue.compute_metrics(None, preds3, refs3, False, 3) == {
        "accuracy": pytest.approx((preds3 == refs3).mean())}
    x, y = rng.normal(size=40), rng.normal(size=40)
    assert run_glue.compute_metrics("stsb", x, y, True, 1) == {"pearson": pytest.approx(pearsonr(x, y)[0]),
                                                                "spearmanr": pytest.approx(spearmanr(x, y)[0])}


def test_distillation_losses():
    from types import SimpleNamespace

    torch.manual_seed(0)
    s = SimpleNamespace(logits=torch.randn(4, 3), hidden_states=tuple(torch.randn(4, 5, 8) for _ in range(3)))
    t = SimpleNamespace(logits=torch.randn(4, 3), hidden_states=tuple(torch.randn(4, 5, 8) for _ in range(3)))
    T = 2.0
    out, layer = run_glue.distillation_losses(s, t, False, T, True)
    ps, pt = torch.softmax(s.logits / T, -1), torch.softmax(t.logits / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean() * T ** 2
    assert out.item() == pytest.approx(kl.item(), rel=1e-5)
    mse = sum(((a - b) ** 2).mean() for a, b in zip(s.hidden_states, t.hidden_states))
    assert layer.item() == pytest.approx(mse.item(), rel=1e-5)
    # Regression: MSE of the logits; no layer term asked for.
    out, layer = run_glue.distillation_losses(s, t, True, T, False)
    assert out.item() == pytest.approx(((s.logits - t.logits) ** 2).mean().item(), rel=1e-5) and layer is None
    t.hidden_states = t.hidden_states[:2]
    with pytest.raises(RuntimeError, match="hidden states"):
        run_glue.distillation_losses(s, t, False, T, True)
