"""run_qa.py end to end on CPU, offline: tiny BERT / DeBERTa-v2, small local SQuAD-format files.

Train + eval with LoSparse, eval-only of the saved checkpoint, SQuAD v2.0, exact resume, the full fine-tuning
baseline, usage errors, and a learnability check (the answer is always the first word of the context).
"""
import json
import math
import random
import re
import shutil
import string

import pytest

import torch

from conftest import REPO, _WORDS, losparse_layers_from_state_dict, losparse_ratios, run_script, save_tiny_model
from run_qa import ALLOW_NAME, BLOCK_NAME
from utils_qa import squad_evaluate

# One thread per run: the CI machine has 2 cores shared by several processes, and oversubscribed OpenMP threads
# make a tiny model hundreds of times slower.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Contexts of up to 30 words do not fit 32 tokens: long examples are split into overlapping windows.
WINDOW = ["--max_seq_length", 32, "--doc_stride", 8]
LOSPARSE = ["--low_rank_parameter_ratio", 0.1, "--final_threshold", 0.2, "--warmup_steps", 4, "--initial_warmup", 1,
            "--final_warmup", 2, "--deltaT", 2]


def make_squad(path, n, seed, unanswerable=0.0, first_word=False):
    """A small SQuAD-format json (flat records under "data") of words from the tiny vocabulary.

    ``first_word``: the answer is always the first word of the context, a random letter string (so it spans
    several word pieces and the end position has to be learned too).
    """
    rng = random.Random(seed)
    data = []
    for i in range(n):
        if first_word:
            words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 5)))]
            words += [rng.choice(_WORDS) for _ in range(rng.randint(4, 10))]
            a, b = 0, 1
        else:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 30))]
            a = rng.randrange(len(words))
            b = min(len(words), a + rng.randint(1, 3))
        context = " ".join(words)
        start = len(" ".join(words[:a])) + (1 if a else 0)
        text = " ".join(words[a:b])
        assert context[start:start + len(text)] == text
        answers = {"text": [text], "answer_start": [start]}
        if rng.random() < unanswerable:
            answers = {"text": [], "answer_start": []}
        question = "what " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 5)))
        data.append({"id": f"q{seed}-{i}", "title": "tiny", "context": context, "question": question,
                     "answers": answers})
    path.write_text(json.dumps({"version": "tiny", "data": data}))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    return {
        "bert": save_tiny_model(root / "bert", "bert", "qa"),
        "deberta": save_tiny_model(root / "deberta", "deberta", "qa"),
        "train": make_squad(root / "train.json", 64, 0),
        "dev": make_squad(root / "dev.json", 24, 1),
        "train_v2": make_squad(root / "train_v2.json", 64, 2, unanswerable=0.3),
        "dev_v2": make_squad(root / "dev_v2.json", 24, 3, unanswerable=0.3),
        "first_train": make_squad(root / "first_train.json", 400, 4, first_word=True),
        "first_dev": make_squad(root / "first_dev.json", 100, 5, first_word=True),
    }


def run_qa(args):
    proc = run_script("run_qa.py", args, extra_env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def results(out):
    return json.loads((out / "all_results.json").read_text())


def check_ratio(out, res, low_rank, final):
    """The effective ratio is that of the saved checkpoint: the ranks of ``--low_rank_parameter_ratio`` plus the
    final fraction of S, within one row per layer (as in test_run_glue.py)."""
    layers = losparse_layers_from_state_dict(torch.load(out / "pytorch_model.bin", weights_only=True))
    assert len(layers) == 12  # 2 layers x (q, k, v, attention output, intermediate, output)
    # ranks ceil(ratio * H * W / (H + W)) of the 32 x 32 and 64 x 32 / 32 x 64 matrices
    r32, r64 = (math.ceil(low_rank * 1024 / 64), math.ceil(low_rank * 2048 / 96))
    assert sorted({(l["out"], l["in"], l["rank"]) for l in layers}) == [(32, 32, r32), (32, 64, r64), (64, 32, r64)]
    low, sparse, tol = losparse_ratios(layers)
    assert low == pytest.approx((4 * r32 * 64 + 2 * r64 * 96) / 8192, abs=1e-12)
    assert res["effective_ratio"] == pytest.approx(low + sparse, abs=1e-12)
    assert abs(res["effective_ratio"] - (low + final)) <= tol, (res["effective_ratio"], low + final, tol)
    assert sparse > 0


def ids(path):
    return [r["id"] for r in json.loads(path.read_text())["data"]]


@pytest.mark.parametrize("kind", ["bert", "deberta"])
def test_train_eval_then_eval_only_reproduces(assets, tmp_path, kind):
    out = tmp_path / "train"
    proc = run_qa(["--model_name_or_path", assets[kind], "--train_file", assets["train"], "--validation_file",
                   assets["dev"], *WINDOW, "--per_device_train_batch_size", 8, "--num_train_epochs", 3,
                   "--learning_rate", 1e-3, "--seed", 0, "--eval_steps", 10, *LOSPARSE, "--output_dir", out]
                  + (["--pad_to_max_length"] if kind == "deberta" else []))
    log = proc.stdout + proc.stderr
    n_examples, n_features = map(int, re.search(r"Num examples = (\d+) \((\d+) features\)", log).groups())
    assert n_examples == 24 and n_features > n_examples  # long contexts were split into windows
    assert "step 10: exact_match" in log and "effective ratio" in log  # the eval during training
    assert "of dense" in proc.stdout  # the compression report table

    res = results(out)
    for f in ("predictions.json", "nbest_predictions.json", "pytorch_model.bin", "model.safetensors", "config.json",
              "tokenizer.json", "compact/losparse_model.safetensors", "compact/losparse_config.json"):
        assert (out / f).is_file(), f
    assert not (out / "null_odds.json").exists()
    predictions = json.loads((out / "predictions.json").read_text())
    assert list(predictions) == ids(assets["dev"])
    assert 0 <= res["eval_exact_match"] <= 100 and 0 <= res["eval_f1"] <= 100
    # 12 replaced 32x32 / 64x32 matrices at rank 2-3 (about 13 % of their parameters) + 20 % of the rows of S
    check_ratio(out, res, 0.1, 0.2)
    assert res["train_steps"] == 3 * 11 and res["threshold"] == pytest.approx(0.2)
    assert res["model_params"] < res["model_params_dense_equivalent"]
    assert res["train_runtime_s"] > 0
    # the numbers are those of the official metric on the written predictions
    refs = {r["id"]: r["answers"]["text"] for r in json.loads(assets["dev"].read_text())["data"]}
    again = squad_evaluate(predictions, refs)
    assert res["eval_exact_match"] == pytest.approx(again["exact_match"])
    assert res["eval_f1"] == pytest.approx(again["f1"])

    # eval-only on the saved checkpoint: same predictions, same numbers, same compression
    out2 = tmp_path / "eval"
    run_qa(["--model_name_or_path", assets[kind], "--validation_file", assets["dev"], *WINDOW,
            "--num_train_epochs", 0, "--eval_checkpoint", out / "pytorch_model.bin", "--output_dir", out2]
           + (["--pad_to_max_length"] if kind == "deberta" else []))
    res2 = results(out2)
    for key in ("eval_exact_match", "eval_f1", "effective_ratio", "model_params"):
        assert res2[key] == res[key], key
    assert res2["train_steps"] == 0
    assert (out2 / "nbest_predictions.json").read_text() == (out / "nbest_predictions.json").read_text()
    assert not (out2 / "pytorch_model.bin").exists()  # eval-only does not re-save the model

    if kind == "bert":  # the compact export is the same trained model
        from transformers import AutoModelForQuestionAnswering

        import utils
        model = AutoModelForQuestionAnswering.from_pretrained(assets[kind])
        utils.substitute_layer_weights(model, ALLOW_NAME, BLOCK_NAME, parameter_ratio=0.1, do_svd=False)
        utils.load_checkpoint(model, out / "pytorch_model.bin")
        compact = utils.load_compact(out / "compact", AutoModelForQuestionAnswering)
        input_ids = torch.randint(5, 100, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(compact(input_ids=input_ids).start_logits,
                                       model.eval()(input_ids=input_ids).start_logits)


def test_squad_v2_null_answers(assets, tmp_path):
    out = tmp_path / "v2"
    run_qa(["--model_name_or_path", assets["bert"], "--train_file", assets["train_v2"], "--validation_file",
            assets["dev_v2"], "--version_2_with_negative", *WINDOW, "--per_device_train_batch_size", 8,
            "--num_train_epochs", 2, "--learning_rate", 1e-3, "--seed", 0, *LOSPARSE, "--output_dir", out])
    res = results(out)
    predictions = json.loads((out / "predictions.json").read_text())
    null_odds = json.loads((out / "null_odds.json").read_text())
    assert list(predictions) == list(null_odds) == ids(assets["dev_v2"])
    # threshold 0: the null answer is predicted exactly when the null score beats the best span
    assert all((predictions[q] == "") == (null_odds[q] > 0.0) for q in predictions)
    refs = {r["id"]: r["answers"]["text"] for r in json.loads(assets["dev_v2"].read_text())["data"]}
    expected = squad_evaluate(predictions, refs, version_2_with_negative=True)
    n_no_answer = sum(1 for g in refs.values() if not g)
    assert 0 < n_no_answer < len(refs)
    assert res["eval_NoAns_total"] == n_no_answer and res["eval_HasAns_total"] == len(refs) - n_no_answer
    for key in ("exact_match", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"):
        assert res[f"eval_{key}"] == pytest.approx(expected[key]), key
    assert res["eval_exact_match"] == res["eval_exact"]


def test_resume_from_checkpoint_is_exact(assets, tmp_path):
    common = ["--model_name_or_path", assets["bert"], "--train_file", assets["train"], "--validation_file",
              assets["dev"], *WINDOW, "--per_device_train_batch_size", 8, "--num_train_epochs", 3,
              "--learning_rate", 1e-3, "--seed", 0, *LOSPARSE]
    full = tmp_path / "full"
    run_qa(common + ["--output_dir", full, "--checkpointing_steps", 7])
    assert sorted(p.name for p in full.glob("step_*")) == ["step_14", "step_21", "step_28", "step_7"]
    assert (full / "step_14" / "custom_checkpoint_0.pkl").is_file()  # the pruner's scores travel with the state
    # step 14 is mid-epoch (11 batches per epoch) and mid-schedule: the resumed run must see the same batches
    # and the same importance scores to end on the same weights
    # "latest" picks the most recently written checkpoint of --output_dir
    resumed = tmp_path / "resumed"
    for name in ("step_7", "step_14"):
        shutil.copytree(full / name, resumed / name)  # keeps the modification times
    proc = run_qa(common + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    assert re.search(r"Resumed from checkpoint: \S*step_14", proc.stdout + proc.stderr)
    assert (resumed / "nbest_predictions.json").read_text() == (full / "nbest_predictions.json").read_text()
    a, b = results(full), results(resumed)
    for key in ("eval_exact_match", "eval_f1", "effective_ratio", "train_steps"):
        assert a[key] == b[key], key
    wa, wb = (torch.load(d / "pytorch_model.bin", weights_only=True) for d in (full, resumed))
    assert wa.keys() == wb.keys()
    for k in wa:  # the same weights, bit for bit (the masks included)
        assert torch.equal(wa[k], wb[k]), k


def test_full_finetuning_baseline(assets, tmp_path):
    out = tmp_path / "full"
    run_qa(["--model_name_or_path", assets["bert"], "--train_file", assets["train"], "--validation_file",
            assets["dev"], *WINDOW, "--per_device_train_batch_size", 8, "--max_train_steps", 5, "--seed", 0,
            "--no_losparse", "--with_tracking", "--output_dir", out])
    res = results(out)
    assert res["effective_ratio"] == 1.0 and res["threshold"] is None and res["train_steps"] == 5
    assert res["model_params"] == res["model_params_dense_equivalent"]
    keys = torch.load(out / "pytorch_model.bin", weights_only=True).keys()
    assert not any(k.endswith(("left.weight", "sparse.weight")) for k in keys)


@pytest.mark.parametrize("extra, message", [
    (["--final_threshold", 1.5], "--final_threshold"),
    (["--low_rank_parameter_ratio", 0], "--low_rank_parameter_ratio"),
    (["--doc_stride", 40], "--doc_stride"),
    (["--n_best_size", 0], "--n_best_size"),
    (["--checkpointing_steps", "often"], "--checkpointing_steps"),
    (["--eval_checkpoint", "{train}"], "--eval_checkpoint"),
    (["--resume_from_checkpoint", "{train}"], "--resume_from_checkpoint"),
    (["--validation_file", "missing.json"], "--validation_file"),
    (["--train_file", "{root}/train.txt"], "--train_file"),
    (["--dataset_name", "squad"], "--dataset_name"),
    (["--num_train_epochs", 0, "--dataset_name", "squad_v2", "--validation_file", None], "--version_2_with_negative"),
])
def test_usage_errors_name_the_flag(assets, capsys, extra, message):
    import run_qa

    args = ["--model_name_or_path", assets["bert"], "--train_file", assets["train"], "--validation_file",
            assets["dev"], *WINDOW]
    if None in extra:  # drop the local files
        args, extra = args[:2] + args[6:], extra[:-2]
    extra = [str(a).format(train=assets["train"], root=assets["train"].parent) for a in extra]
    with pytest.raises(SystemExit) as exc:
        run_qa.parse_args([str(a) for a in args + extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_usage_error_exits_2_before_loading_anything(assets, tmp_path):
    args = ["--model_name_or_path", assets["bert"], "--train_file", assets["train"], "--validation_file",
            assets["dev"], "--final_threshold", 1.5, "--output_dir", tmp_path / "out"]
    proc = run_script("run_qa.py", args, extra_env=ENV)
    assert proc.returncode == 2
    assert "--final_threshold must be in (0, 1], got 1.5" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_warmups_longer_than_the_run_and_v1_without_answers(assets, tmp_path):
    args = ["--model_name_or_path", assets["bert"], "--train_file", assets["train"], "--validation_file",
            assets["dev"], *WINDOW, "--output_dir", tmp_path / "out", "--max_train_steps", 5]
    proc = run_script("run_qa.py", args + ["--warmup_steps", 100], extra_env=ENV)
    assert proc.returncode != 0 and "--warmup_steps" in proc.stderr
    # unanswerable questions in SQuAD v1.1 mode
    proc = run_script("run_qa.py", args + ["--validation_file", assets["dev_v2"]], extra_env=ENV)
    assert proc.returncode != 0 and "--version_2_with_negative" in proc.stderr


def test_learns_the_first_word(assets, tmp_path):
    """Mild compression (low-rank 25 % + half of S): a few hundred steps find the first word of the context."""
    common = ["--model_name_or_path", assets["bert"], "--validation_file", assets["first_dev"], *WINDOW,
              "--seed", 1]
    untrained = tmp_path / "untrained"
    run_qa(common + ["--num_train_epochs", 0, "--no_losparse", "--output_dir", untrained])
    out = tmp_path / "trained"
    run_qa(common + ["--train_file", assets["first_train"], "--per_device_train_batch_size", 16,
                     "--max_train_steps", 300, "--learning_rate", 2e-3, "--num_warmup_steps", 30,
                     "--low_rank_parameter_ratio", 0.25, "--final_threshold", 0.5, "--warmup_steps", 30,
                     "--initial_warmup", 1, "--final_warmup", 3, "--output_dir", out])
    chance, res = results(untrained)["eval_exact_match"], results(out)["eval_exact_match"]
    assert chance < 15
    assert res >= 80 and res - chance >= 65, (chance, res)
    check_ratio(out, results(out), 0.25, 0.5)


@pytest.mark.parametrize("variant", ["deberta", "bert", "eval"])
def test_train_qa_sh_commands_are_valid(assets, variant):
    """train_qa.sh (with PYTHON=echo) prints commands that run_qa.py accepts; `bert` is the original command."""
    import subprocess

    import run_qa

    env = {"PATH": "/usr/bin:/bin", "PYTHON": "echo", "CHECKPOINT": str(assets["train"])}
    proc = subprocess.run(["bash", str(REPO / "train_qa.sh"), variant, "--with_tracking"], env=env,
                          capture_output=True, text=True, check=True)
    argv = proc.stdout.split()
    assert argv[0] == "run_qa.py" and argv[-1] == "--with_tracking"
    args = run_qa.parse_args(argv[1:])
    assert args.dataset_name == "squad"
    if variant == "eval":
        assert args.num_train_epochs == 0 and args.eval_checkpoint == str(assets["train"])
        return
    expected = {"warmup_steps": 5400, "initial_threshold": 1.0, "final_threshold": 0.45 if variant == "bert" else 0.15,
                "initial_warmup": 1, "final_warmup": 5, "beta1": 0.85, "per_device_train_batch_size": 16,
                "learning_rate": 5e-5, "num_train_epochs": 10, "num_warmup_steps": 3681,
                "low_rank_parameter_ratio": 0.05, "seed": 7}
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.model_name_or_path == {"bert": "bert-base-uncased", "deberta": "microsoft/deberta-v3-base"}[variant]
