"""run_summarization.py end to end on CPU, offline: a tiny BART, a BERT word-piece tokenizer, small local json.

Train + eval with LoSparse, eval-only of the saved (and of a compacted) checkpoint, exact resume from epoch and
step checkpoints, bf16 autocast, the full fine-tuning baseline, usage errors, generation with compacted layers,
and a learnability check on a copy task (the summary is the text's first sentence).
"""
import copy
import json
import math
import os
import random
import shlex
import shutil
import subprocess

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import run_summarization as rs
import utils
from conftest import REPO, losparse_layers_from_state_dict, losparse_ratios, run_script, save_tiny_model

# One thread per run: the CI machine has 2 cores shared by several processes, and oversubscribed OpenMP threads
# make a tiny model hundreds of times slower.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

SUBJECTS = ["the cat", "the dog", "a man", "a woman", "the child", "the people", "my city", "his country"]
VERBS = ["sat on", "ran to", "is in", "was at", "said to", "love", "hate"]
OBJECTS = ["the mat", "the river", "the bank", "paris", "london", "the city", "the capital", "france"]
COMMON = ["--text_column", "text", "--summary_column", "summary", "--max_source_length", 64,
          "--max_target_length", 24, "--val_max_target_length", 24, "--per_device_train_batch_size", 16,
          "--per_device_eval_batch_size", 16, "--seed", 0]
LOSPARSE = ["--low_rank_parameter_ratio", 0.2, "--final_threshold", 0.2, "--warmup_steps", 4, "--initial_warmup", 1,
            "--final_warmup", 2, "--deltaT", 2]
ROUGE_KEYS = ["eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum"]


def make_copy_task(path, n, seed):
    """json lines: ``text`` = 2-4 template sentences of tiny-vocabulary words, ``summary`` = the first one."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            sents = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for _ in range(rng.randint(2, 4))]
            f.write(json.dumps({"id": rng.random(), "text": " ".join(sents), "summary": sents[0]}) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("summ")
    return {
        "root": root,
        "bart": save_tiny_model(root / "bart", "bart", "seq2seq"),
        "train": make_copy_task(root / "train.json", 64, 0),
        "dev": make_copy_task(root / "dev.json", 16, 1),
        "copy_train": make_copy_task(root / "copy_train.json", 256, 2),
        "copy_dev": make_copy_task(root / "copy_dev.json", 24, 3),
    }


def base_args(assets, out, train=True):
    args = ["--model_name_or_path", assets["bart"], "--validation_file", assets["dev"], "--output_dir", out,
            "--num_beams", 2] + COMMON
    if train:
        args += ["--train_file", assets["train"]]
    return args


def run(args, extra_env=None):
    proc = run_script("run_summarization.py", args, extra_env={**ENV, **(extra_env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def results(out):
    return json.loads((out / "all_results.json").read_text())


def predictions(out, name="generated_predictions.txt"):
    return (out / name).read_text(encoding="utf-8").split("\n")[:-1]


def load_state(path):
    return torch.load(str(path), map_location="cpu", weights_only=True)


def check_ratio(out, res, low_rank=0.2, final=0.2):
    """The effective ratio is that of the saved checkpoint: the ranks of ``--low_rank_parameter_ratio`` plus the
    final fraction of S, within one row per layer (as in test_run_glue.py)."""
    layers = losparse_layers_from_state_dict(load_state(out / "pytorch_model.bin"))
    # BART: 2 encoder layers x 6 matrices, 2 decoder layers x 10 (self- and cross-attention)
    assert len(layers) == 32
    r32, r64 = math.ceil(low_rank * 1024 / 64), math.ceil(low_rank * 2048 / 96)  # ceil(ratio * H * W / (H + W))
    assert {(l["out"], l["in"]): l["rank"] for l in layers} == {(32, 32): r32, (64, 32): r64, (32, 64): r64}
    low, sparse, tol = losparse_ratios(layers)
    assert low == pytest.approx((24 * r32 * 64 + 8 * r64 * 96) / (24 * 1024 + 8 * 2048), abs=1e-12)
    assert res["effective_ratio"] == pytest.approx(low + sparse, abs=1e-12)
    assert abs(res["effective_ratio"] - (low + final)) <= tol, (res["effective_ratio"], low + final, tol)
    assert sparse > 0


def assert_same_weights(a, b):
    sa, sb = load_state(a), load_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def trained(assets):
    """LoSparse: 24 optimizer steps (6 epochs of 4), pruning from step 4 to 16, final 20 % of S for the last 8."""
    out = assets["root"] / "trained"
    args = base_args(assets, out) + LOSPARSE + ["--max_train_steps", 24, "--learning_rate", 5e-3,
                                                "--checkpointing_steps", "epoch", "--with_tracking"]
    proc = run(args)
    return {"out": out, "args": args, "log": proc.stdout + proc.stderr}


# ---------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------
def test_train_and_eval_writes_model_summaries_and_results(trained, assets):
    out, log = trained["out"], trained["log"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "pytorch_model.bin",
                 "generated_predictions.txt", "all_results.json", "compact/losparse_model.safetensors"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("epoch_*")) == [f"epoch_{i}" for i in range(6)]
    res = results(out)
    for k in ROUGE_KEYS + ["eval_gen_len", "effective_ratio", "model_params", "train_runtime_s"]:
        assert isinstance(res[k], float if k != "model_params" else int), k
    for k in ROUGE_KEYS:
        assert 0.0 <= res[k] <= 100.0
    assert res["train_steps"] == 24 and res["threshold"] == pytest.approx(0.2)
    assert res["rougeLsum_sentence_splitter"] == rs.resolve_sentence_splitter("auto")
    # 16 summaries, one per line, and they are what was scored
    preds = predictions(out)
    assert len(preds) == 16 == res["eval_samples"]
    tok = AutoTokenizer.from_pretrained(str(out))
    refs = [json.loads(l)["summary"] for l in assets["dev"].read_text().splitlines()]
    refs = [tok.decode(tok(text_target=r, max_length=24, truncation=True)["input_ids"], skip_special_tokens=True)
            for r in refs]
    rescored = rs.compute_rouge(preds, refs)
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert rescored[k] == pytest.approx(res[f"eval_{k}"], abs=1e-9)
    # ROUGE and the effective ratio are reported in the logs at each eval, with the final table
    assert log.count("effective_ratio") >= 6 and "rougeLsum" in log
    assert "substituted matrices: 32" in log
    # the effective ratio is that of the saved checkpoint: low rank (0.2) + kept rows of S (20 %) < 1
    model = _model_from_checkpoint(assets["bart"], out / "pytorch_model.bin")
    report = utils.compression_report(model)
    assert res["effective_ratio"] == pytest.approx(report.effective_ratio, abs=1e-12)
    assert res["model_params"] == report.model_params
    check_ratio(out, res)
    assert len(report.layers) == 32 and {l["name"].rsplit(".", 1)[-1] for l in report.layers} == \
        {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    # the compact export holds the same model
    compact = utils.load_compact(out / "compact")
    batch = _dev_batch(tok, assets["dev"])
    with torch.no_grad():
        assert torch.equal(model.eval().generate(**batch, num_beams=2, max_length=24),
                           compact.generate(**batch, num_beams=2, max_length=24))


def _model_from_checkpoint(base, ckpt, compact=False):
    model = AutoModelForSeq2SeqLM.from_pretrained(str(base))
    utils.substitute_layer_weights(model, rs.ALLOW_NAME, rs.BLOCK_NAME, parameter_ratio=0.2, do_svd=False)
    utils.load_checkpoint(model, ckpt)
    if compact:
        utils.prune(model)
    return model.eval()


def _dev_batch(tok, path, n=8):
    texts = [json.loads(l)["text"] for l in path.read_text().splitlines()[:n]]
    enc = tok(texts, max_length=64, truncation=True, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_eval_checkpoint_reproduces_last_eval(trained, assets, tmp_path):
    out = tmp_path / "eval"
    run(base_args(assets, out, train=False) + ["--num_train_epochs", 0,
                                               "--eval_checkpoint", trained["out"] / "pytorch_model.bin"])
    want, got = results(trained["out"]), results(out)
    for k in ROUGE_KEYS + ["effective_ratio"]:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    assert got["model_params"] == want["model_params"]
    assert predictions(out) == predictions(trained["out"])
    assert got["train_steps"] == 0


def test_eval_of_compacted_checkpoint_matches(trained, assets, tmp_path):
    """A checkpoint of compacted layers (only the kept rows of S) loads and generates the same summaries."""
    model = _model_from_checkpoint(assets["bart"], trained["out"] / "pytorch_model.bin", compact=True)
    assert all(m.is_compacted for m in model.modules() if isinstance(m, utils.LinearLoSparse))
    utils.save_checkpoint(model, tmp_path / "compact.bin")
    assert any(k.endswith("sparse_weight_pruned") for k in load_state(tmp_path / "compact.bin"))
    out = tmp_path / "eval"
    run(base_args(assets, out, train=False) + ["--num_train_epochs", 0, "--eval_checkpoint", tmp_path / "compact.bin"])
    want, got = results(trained["out"]), results(out)
    for k in ROUGE_KEYS + ["effective_ratio"]:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    assert predictions(out) == predictions(trained["out"])


def test_resume_from_epoch_checkpoint_is_exact(trained, assets, tmp_path):
    out = tmp_path / "resumed"
    args = [a if a != trained["out"] else out for a in trained["args"]]
    proc = run(args + ["--resume_from_checkpoint", trained["out"] / "epoch_2"])
    assert "Resumed from checkpoint" in proc.stdout + proc.stderr
    assert_same_weights(out / "pytorch_model.bin", trained["out"] / "pytorch_model.bin")
    assert predictions(out) == predictions(trained["out"])
    assert results(out)["train_steps"] == 24


def test_resume_from_step_checkpoint_is_exact_with_accumulation(assets, tmp_path):
    """2 micro-batches per step, 2 steps per epoch; step_3 is in the middle of epoch 1."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    extra = LOSPARSE + ["--warmup_steps", 2, "--max_train_steps", 8, "--learning_rate", 5e-3,
                        "--gradient_accumulation_steps", 2, "--checkpointing_steps", 3]
    run(base_args(assets, first) + extra)
    assert sorted(p.name for p in first.glob("step_*")) == ["step_3", "step_6"]
    # `latest`: the newest complete step_<n> / epoch_<i> in --output_dir, here the mid-epoch step_3 copied into it
    shutil.copytree(first / "step_3", resumed / "step_3")
    proc = run(base_args(assets, resumed) + extra + ["--resume_from_checkpoint", "latest"])
    assert f"Resumed from checkpoint: {resumed / 'step_3'}" in proc.stdout + proc.stderr
    assert_same_weights(resumed / "pytorch_model.bin", first / "pytorch_model.bin")
    # the pruner statistics were restored too (they decide which rows are kept)
    pruner_state = torch.load(str(first / "step_3" / "custom_checkpoint_0.pkl"), weights_only=False)
    assert pruner_state["exp_avg_ipt"]
    assert results(resumed)["train_steps"] == 8
    assert results(resumed)["threshold"] == results(first)["threshold"] == pytest.approx(0.2)


def test_bf16_autocast_train_and_generate(assets, tmp_path):
    out = tmp_path / "bf16"
    proc = run(base_args(assets, out) + LOSPARSE + ["--warmup_steps", 2, "--max_train_steps", 8,
                                                    "--learning_rate", 5e-3, "--num_beams", 3,
                                                    "--resume_from_checkpoint", "latest"],
               extra_env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert "Mixed precision type: bf16" in proc.stdout + proc.stderr
    assert "starting from scratch" in proc.stdout + proc.stderr  # `latest` with no checkpoint yet
    res = results(out)
    assert all(math.isfinite(res[k]) for k in ROUGE_KEYS)
    assert len(predictions(out)) == 16
    assert res["threshold"] == pytest.approx(0.2)
    check_ratio(out, res)


def test_full_finetuning_baseline_with_padding_and_test_split(assets, tmp_path):
    out = tmp_path / "full"
    run(base_args(assets, out) + ["--no_losparse", "--max_train_steps", 4, "--learning_rate", 1e-3,
                                  "--pad_to_max_length", "--test_file", assets["dev"], "--do_predict"])
    res = results(out)
    assert res["effective_ratio"] == 1.0 and res["threshold"] is None
    assert not any("sparse" in k or "left" in k for k in load_state(out / "pytorch_model.bin"))
    for k in ROUGE_KEYS:
        assert res["test_" + k[5:]] == pytest.approx(res[k], abs=1e-9)  # the test file is the dev file
    assert predictions(out, "test_generated_predictions.txt") == predictions(out)


# ---------------------------------------------------------------------------------------------------
# Generation with LoSparse layers: compacted == uncompacted; bf16 autocast
# ---------------------------------------------------------------------------------------------------
def test_compacted_generation_equals_uncompacted(assets):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(assets["bart"]))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(assets["bart"])).eval()
    utils.substitute_layer_weights(model, rs.ALLOW_NAME, rs.BLOCK_NAME, parameter_ratio=0.2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # what the pruner leaves: about half of the rows of each S are zero
        for m in model.modules():
            if isinstance(m, utils.LinearLoSparse):
                m.sparse.weight.mul_((torch.rand(m.out_feature, 1, generator=g) < 0.5).float())
    compact = copy.deepcopy(model)
    assert utils.prune(compact) == 32
    assert all(m.kept_rows < m.out_feature for m in compact.modules() if isinstance(m, utils.LinearLoSparse))
    batch = _dev_batch(tok, assets["dev"])
    labels = tok(text_target=["the cat sat on the mat."] * 8, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for kw in ({"num_beams": 3}, {"num_beams": 1}):
            a = model.generate(**batch, max_length=20, **kw)
            b = compact.generate(**batch, max_length=20, **kw)
            assert torch.equal(a, b), kw
        la, lb = model(**batch, labels=labels), compact(**batch, labels=labels)
        assert torch.allclose(la.logits, lb.logits, atol=1e-5)
        assert la.loss.item() == pytest.approx(lb.loss.item(), abs=1e-5)
        # bf16 autocast: generation runs and the loss stays close to the fp32 one, compacted or not
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for m in (model, compact):
                out = m.generate(**batch, max_length=20, num_beams=3)
                assert out.shape[0] == 8 and out.shape[1] <= 20
                loss = m(**batch, labels=labels).loss
                assert math.isfinite(loss.item()) and loss.item() == pytest.approx(la.loss.item(), rel=0.05)
    # gradients flow through the compacted layers
    compact.train()
    compact(**batch, labels=labels).loss.backward()
    layer = compact.model.encoder.layers[0].fc1
    assert layer.sparse_weight_pruned.grad is not None and layer.left.weight.grad is not None


# ---------------------------------------------------------------------------------------------------
# Preprocessing and usage errors
# ---------------------------------------------------------------------------------------------------
def test_preprocess_pads_labels_with_minus_100(assets):
    tok = AutoTokenizer.from_pretrained(str(assets["bart"]))
    ex = {"text": ["the cat sat on the mat. the dog ran.", "a man"], "summary": ["the cat sat.", "a man"]}
    out = rs.preprocess_function(ex, tok, "text", "summary", prefix="summary : ", max_source_length=16,
                                 max_target_length=8, padding="max_length", ignore_pad_token_for_loss=True)
    assert set(out) == {"input_ids", "attention_mask", "labels"}  # no token_type_ids for BART
    assert all(len(x) == 16 for x in out["input_ids"]) and all(len(x) == 8 for x in out["labels"])
    assert out["labels"][1] == [2, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("man"), 3] + [-100] * 4
    assert out["input_ids"][1][:3] == [2] + tok.convert_tokens_to_ids(["summary", ":"])
    kept = rs.preprocess_function(ex, tok, "text", "summary", max_target_length=8, padding="max_length",
                                  ignore_pad_token_for_loss=False)
    assert kept["labels"][1][-4:] == [tok.pad_token_id] * 4
    dynamic = rs.preprocess_function(ex, tok, "text", "summary", max_target_length=8)
    assert [len(x) for x in dynamic["labels"]] == [6, 4]


def _parse(assets, *extra):
    return rs.parse_args([str(a) for a in base_args(assets, assets["root"] / "unused") + list(extra)])


@pytest.mark.parametrize("extra,message", [
    (["--final_threshold", 1.5], "--final_threshold"),
    (["--num_beams", 0], "--num_beams"),
    (["--max_source_length", 0], "--max_source_length"),
    (["--checkpointing_steps", "often"], "--checkpointing_steps"),
    (["--train_file", "data.txt"], "--train_file"),
    (["--eval_checkpoint", "missing.bin", "--num_train_epochs", 0], "--eval_checkpoint"),
    (["--eval_checkpoint", "{bart}/model.safetensors"], "--num_train_epochs 0"),
    (["--resume_from_checkpoint", "{bart}"], "--resume_from_checkpoint"),
    (["--resume_from_checkpoint", "{bart}/no_such_dir"], "--resume_from_checkpoint"),
    (["--ignore_pad_token_for_loss", "maybe"], "--ignore_pad_token_for_loss"),
    (["--sentence_splitter", "spacy"], "--sentence_splitter"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_usage_errors_name_the_flag(assets, capsys, extra, message):
    extra = [str(e).format(bart=assets["bart"]) for e in extra]
    with pytest.raises(SystemExit) as e:
        _parse(assets, *extra)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_usage_error_needs_train_file_to_train(assets, capsys):
    with pytest.raises(SystemExit):
        rs.parse_args(["--model_name_or_path", str(assets["bart"]), "--validation_file", str(assets["dev"])])
    assert "--train_file" in capsys.readouterr().err
    # evaluation only needs the validation file
    args = rs.parse_args(["--model_name_or_path", str(assets["bart"]), "--validation_file", str(assets["dev"]),
                          "--num_train_epochs", "0"])
    assert args.train_file is None


def test_flags_of_the_original_parse(assets):
    args = _parse(assets, "--dataset_config", "3.0.0", "--ignore_pad_token_for_loss", "false",
                  "--checkpointing_steps", "epoch", "--with_tracking", "--pad_to_max_length", "--source_prefix",
                  "summarize: ")
    assert args.dataset_config_name == "3.0.0" and args.ignore_pad_token_for_loss is False
    assert args.checkpointing_steps == "epoch" and args.with_tracking and args.pad_to_max_length
    assert _parse(assets).ignore_pad_token_for_loss is True
    assert _parse(assets, "--ignore_pad_token_for_loss").ignore_pad_token_for_loss is True
    # the LoSparse flags come from utils.add_losparse_args, with the original defaults
    d = _parse(assets)
    assert (d.low_rank_parameter_ratio, d.final_threshold, d.deltaT, d.beta1, d.no_losparse) == (0.05, 0.1, 10, 0.85,
                                                                                                  False)


def test_usage_error_exits_2_before_loading_anything(tmp_path):
    proc = run_script("run_summarization.py", ["--model_name_or_path", tmp_path / "no-such-model", "--train_file",
                                               tmp_path / "no.json", "--final_threshold", 1.5], extra_env=ENV)
    assert proc.returncode == 2
    assert "--final_threshold must be in (0, 1]" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------
# Learnability: copy the first sentence
# ---------------------------------------------------------------------------------------------------
def test_learns_to_copy_the_first_sentence(assets, tmp_path):
    """LoSparse (low rank 0.4 + 50 % of S): ROUGE goes from ~0 at step 0 to far above it in 240 CPU steps."""
    data = ["--model_name_or_path", assets["bart"], "--train_file", assets["copy_train"], "--validation_file",
            assets["copy_dev"], "--num_beams", 2] + COMMON
    compression = ["--low_rank_parameter_ratio", 0.4, "--final_threshold", 0.5, "--warmup_steps", 24,
                   "--initial_warmup", 2, "--final_warmup", 3, "--deltaT", 10]
    run(data + compression + ["--output_dir", tmp_path / "step0", "--num_train_epochs", 0])
    run(data + compression + ["--output_dir", tmp_path / "trained", "--max_train_steps", 240, "--learning_rate", 5e-3,
                              "--num_warmup_steps", 24])
    before, after = results(tmp_path / "step0"), results(tmp_path / "trained")
    assert before["train_steps"] == 0 and after["train_steps"] == 240
    assert before["eval_rouge1"] < 20
    assert after["eval_rouge1"] > before["eval_rouge1"] + 40, (before, after)
    assert after["eval_rouge2"] > before["eval_rouge2"] + 25, (before, after)
    assert after["eval_rougeLsum"] > before["eval_rougeLsum"] + 40, (before, after)
    assert after["effective_ratio"] < 1.0


# ---------------------------------------------------------------------------------------------------
# train_summarization.sh
# ---------------------------------------------------------------------------------------------------
def _sh(*args, env=None):
    """Run train_summarization.sh with PYTHON=echo: the command lines it would run, one per line."""
    proc = subprocess.run(["bash", str(REPO / "train_summarization.sh"), *args],
                          env={**os.environ, "PYTHON": "echo", **(env or {})}, capture_output=True, text=True,
                          timeout=60)
    return proc, [shlex.split(l) for l in proc.stdout.splitlines()]


def test_train_script_runs_the_original_commands():
    proc, lines = _sh()
    assert proc.returncode == 0, proc.stderr
    assert [l[0] for l in lines] == ["run_summarization.py"] * 2
    for line, name in zip(lines, ("xsum", "cnn_dailymail")):
        args = rs.parse_args(line[1:])  # every flag exists and passes validation
        assert args.dataset_name == name and args.model_name_or_path == "facebook/bart-large"
        assert (args.low_rank_parameter_ratio, args.final_threshold, args.deltaT) == (0.35, 0.05, 100)
        assert args.num_beams == 6 and args.beta1 == 0.85
        assert (args.initial_warmup, args.final_warmup, args.learning_rate, args.num_train_epochs) == (2, 8, 6e-5, 12)
        assert args.checkpointing_steps == "epoch" and args.with_tracking and args.seed == 42
        assert args.max_source_length == 256 and args.per_device_train_batch_size == 32
        assert args.output_dir == f"output/{name}/lrr0.35_pr0.05/lr6e-5/seed_42"
    assert rs.parse_args(lines[1][1:]).dataset_config_name == "3.0.0"


def test_train_script_eval_and_extra_flags(tmp_path):
    proc, (line,) = _sh("xsum", "--resume_from_checkpoint", "latest", "--max_train_samples", "100")
    assert proc.returncode == 0, proc.stderr
    args = rs.parse_args(line[1:])
    assert args.resume_from_checkpoint == "latest" and args.max_train_samples == 100
    assert args.dataset_revision == "refs/convert/parquet"
    ckpt = tmp_path / "pytorch_model.bin"
    ckpt.write_bytes(b"")
    proc, (line,) = _sh("eval", env={"CHECKPOINT": str(ckpt), "DATASET": "cnn_dailymail"})
    assert proc.returncode == 0, proc.stderr
    args = rs.parse_args(line[1:])
    assert args.eval_checkpoint == str(ckpt) and args.num_train_epochs == 0 and args.num_beams == 6
    assert args.dataset_name == "cnn_dailymail" and args.dataset_config_name == "3.0.0"
    proc, _ = _sh("eval")
    assert proc.returncode != 0 and "CHECKPOINT" in proc.stderr
    proc, _ = _sh("squad")
    assert proc.returncode == 2 and "usage" in proc.stderr
