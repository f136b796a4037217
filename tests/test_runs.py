"""Nothing lost to a bad path or a Ctrl-C (all four scripts share utils.py's section 8).

* Start-up checks: an output directory that cannot be written, an empty data file, a truncated or non-checkpoint
  ``--eval_checkpoint`` / ``--stored_model_path``, an incomplete ``--resume_from_checkpoint`` folder: exit 2 with one
  line naming the flag and the file, before any model is loaded (so before the first optimizer step).
* Atomic checkpoints: ``save_state_atomic`` writes ``step_N.incomplete`` and renames it when complete; the latest
  lookup takes only complete folders and says which it skipped.
* Ctrl-C: a real SIGINT in a child process while it writes a checkpoint (at three points of the write) and while
  it trains; each run resumes with ``--resume_from_checkpoint latest`` and the last one ends with the same weights
  as an uninterrupted run, bit for bit.
"""
import csv
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_script, save_tiny_model

import losparse.checkpoint
import losparse.runs
import utils

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WORDS = ["good", "bad", "the", "movie", "cat", "dog", "was", "great", "awful", "film", "it", "is"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    save_tiny_model(root / "bert", "bert")
    save_tiny_model(root / "bert-qa", "bert", head="qa")
    save_tiny_model(root / "bart", "bart", head="seq2seq")
    rng = random.Random(0)
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        for i in range(24):
            w.writerow([" ".join(rng.choice(WORDS) for _ in range(5)), i % 2])
    with open(root / "summ.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "summary"])
        for _ in range(4):
            w.writerow([" ".join(rng.choice(WORDS) for _ in range(8)), " ".join(rng.choice(WORDS) for _ in range(3))])
    (root / "header_only.csv").write_text("sentence,label\n")
    (root / "summ_header_only.csv").write_text("text,summary\n")
    (root / "empty.txt").write_text("\n  \n")
    (root / "short.txt").write_text("good movie\n")  # fewer tokens than one block
    (root / "text.txt").write_text("".join(" ".join(rng.choice(WORDS) for _ in range(8)) + "\n" for _ in range(20)))
    (root / "squad_empty.json").write_text(json.dumps({"data": []}))
    squad = [{"id": "0", "title": "t", "context": "the cat was good", "question": "what was good",
              "answers": {"text": ["the cat"], "answer_start": [0]}}]
    (root / "squad.json").write_text(json.dumps({"data": squad}))
    (root / "a_file").write_text("not a folder\n")
    # checkpoints: a real one, the same cut in half, and a text file named like a checkpoint
    sd = {"w": torch.arange(4096, dtype=torch.float32)}
    torch.save(sd, root / "good.bin")
    data = (root / "good.bin").read_bytes()
    (root / "truncated.bin").write_bytes(data[: len(data) // 2])
    (root / "notes.bin").write_text("these are my notes, not a checkpoint\n")
    from safetensors.torch import save_file
    save_file(sd, str(root / "good.safetensors"))
    data = (root / "good.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[:-100])
    (root / "step_4").mkdir()  # what an interrupted Accelerate save_state left before: weights, no optimizer.bin
    (root / "step_4" / "model.safetensors").write_bytes(data)
    return root


# ----------------------------------------------------------------------------------------------------
# Reading checkpoint files
# ----------------------------------------------------------------------------------------------------
def test_load_checkpoint_names_a_truncated_file_and_its_size(assets):
    model = torch.nn.Linear(2, 2)
    for name in ("truncated.bin", "notes.bin", "truncated.safetensors"):
        path = assets / name
        with pytest.raises(utils.CheckpointFileError) as e:
            utils.load_checkpoint(model, path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: truncated or not a checkpoint ({path.stat().st_size} bytes; ")
        assert "\n" not in msg
    for name in ("good.bin", "good.safetensors"):  # whole files pass the header check and load
        utils.check_checkpoint_file(assets / name, "--eval_checkpoint")
        assert torch.equal(losparse.checkpoint.read_state_dict(assets / name)["w"], torch.arange(4096, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------------
# Start-up checks, through each script's main()
# ----------------------------------------------------------------------------------------------------
def _glue(a):
    return ["--model_name_or_path", a / "bert", "--train_file", a / "train.csv", "--validation_file", a / "train.csv",
            "--output_dir", a / "out_glue"]


def _glue_eval(a):
    return ["--model_name_or_path", a / "bert", "--validation_file", a / "train.csv", "--num_train_epochs", 0,
            "--output_dir", a / "out_glue_eval"]


def _qa(a):
    return ["--model_name_or_path", a / "bert-qa", "--train_file", a / "squad.json", "--validation_file",
            a / "squad.json", "--max_seq_length", 64, "--doc_stride", 16, "--output_dir", a / "out_qa"]


def _summ(a):
    return ["--model_name_or_path", a / "bart", "--train_file", a / "summ.csv", "--validation_file", a / "summ.csv",
            "--text_column", "text", "--summary_column", "summary", "--output_dir", a / "out_summ"]


def _clm(a):
    return ["--model_name_or_path", a / "bert", "--train_file", a / "text.txt", "--validation_file", a / "text.txt",
            "--block_size", 8, "--output_dir", a / "out_clm"]


# (script, base args, extra args (override the flags they repeat), flag and file that the last line names)
CASES = {
    "glue-output-dir-through-a-file": ("run_glue", _glue, ["--output_dir", "{a}/a_file/out"],
                                       "--output_dir {a}/a_file/out: cannot be created or written (Not a directory)"),
    "glue-checkpointing-without-output-dir": ("run_glue", _glue, ["--output_dir", None, "--checkpointing_steps", 2],
                                              "--checkpointing_steps (without --output_dir, the current directory) "
                                              "{a}/a_file: cannot be created"),
    "glue-header-only-csv": ("run_glue", _glue, ["--validation_file", "{a}/header_only.csv"],
                             "--validation_file {a}/header_only.csv: no examples (no rows after the header)"),
    "glue-truncated-eval-checkpoint": ("run_glue", _glue_eval, ["--eval_checkpoint", "{a}/truncated.bin"],
                                       "--eval_checkpoint {a}/truncated.bin: truncated or not a checkpoint ({size} "
                                       "bytes; "),
    "glue-not-a-checkpoint": ("run_glue", _glue_eval, ["--eval_checkpoint", "{a}/notes.bin"],
                              "--eval_checkpoint {a}/notes.bin: truncated or not a checkpoint ({size} bytes; neither "
                              "a torch.save zip nor a pickle)"),
    "glue-truncated-stored-model": ("run_glue", _glue, ["--stored_model_path", "{a}/truncated.safetensors"],
                                    "--stored_model_path {a}/truncated.safetensors: truncated or not a checkpoint "
                                    "({size} bytes; the tensors need"),
    "glue-incomplete-resume-folder": ("run_glue", _glue, ["--resume_from_checkpoint", "{a}/step_4"],
                                      "--resume_from_checkpoint {a}/step_4: not a complete checkpoint: no "
                                      "losparse_checkpoint.json"),
    "qa-output-dir-through-a-file": ("run_qa", _qa, ["--output_dir", "{a}/a_file/out"],
                                     "--output_dir {a}/a_file/out: cannot be created or written (Not a directory)"),
    "qa-no-questions": ("run_qa", _qa, ["--train_file", "{a}/squad_empty.json"],
                        "--train_file {a}/squad_empty.json: no examples (no question in the file)"),
    "qa-truncated-eval-checkpoint": ("run_qa", _qa, ["--train_file", None, "--num_train_epochs", 0,
                                                     "--eval_checkpoint", "{a}/truncated.bin"],
                                     "--eval_checkpoint {a}/truncated.bin: truncated or not a checkpoint ({size} "
                                     "bytes; "),
    "summarization-output-dir-through-a-file": ("run_summarization", _summ, ["--output_dir", "{a}/a_file/out"],
                                                "--output_dir {a}/a_file/out: cannot be created or written (Not a "
                                                "directory)"),
    "summarization-header-only-csv": ("run_summarization", _summ, ["--train_file", "{a}/summ_header_only.csv"],
                                      "--train_file {a}/summ_header_only.csv: no examples (no rows after the header)"),
    "summarization-truncated-eval-checkpoint": ("run_summarization", _summ,
                                                ["--train_file", None, "--num_train_epochs", 0,
                                                 "--eval_checkpoint", "{a}/truncated.bin"],
                                                "--eval_checkpoint {a}/truncated.bin: truncated or not a checkpoint "
                                                "({size} bytes; "),
    "clm-output-dir-through-a-file": ("run_clm", _clm, ["--output_dir", "{a}/a_file/out"],
                                      "--output_dir {a}/a_file/out: cannot be created or written (Not a directory)"),
    "clm-empty-text-file": ("run_clm", _clm, ["--train_file", "{a}/empty.txt"],
                            "--train_file {a}/empty.txt: no examples (an empty file)"),
    "clm-truncated-eval-checkpoint": ("run_clm", _clm, ["--train_file", None, "--num_train_epochs", 0,
                                                        "--eval_checkpoint", "{a}/truncated.bin"],
                                      "--eval_checkpoint {a}/truncated.bin: truncated or not a checkpoint ({size} "
                                      "bytes; "),
}


def _argv(assets, base, extra):
    args = [str(x) for x in base(assets)]
    for i in range(0, len(extra), 2):
        flag, value = extra[i], extra[i + 1]
        if flag in args:
            j = args.index(flag)
            del args[j:j + 2]
        if value is not None:
            args += [flag, str(value).format(a=assets)]
    return args


@pytest.mark.parametrize("case", list(CASES))
def test_bad_path_or_file_stops_at_start_up(assets, case, monkeypatch, capsys):
    import importlib

    import transformers

    script, base, extra, expected = CASES[case]
    module = importlib.import_module(script)
    argv = _argv(assets, base, extra)
    started = []  # model loading or an optimizer step: neither may happen
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        classmethod(lambda cls, *a, **k: started.append("model loading") or 1 / 0))
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda *a, **k: started.append("optimizer step"))
    monkeypatch.chdir(assets)
    if "without-output-dir" in case:  # the current directory is a path through a file
        monkeypatch.setattr(os, "getcwd", lambda: str(assets / "a_file"))
    monkeypatch.setattr(sys, "argv", [f"{script}.py"] + argv)
    with pytest.raises(SystemExit) as e, utils.one_line_errors(f"{script}.py"):
        module.main() if script in ("run_qa", "run_summarization") else module.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    named = expected.split(":")[0].split(" ", 1)[1].format(a=assets)  # the file the message names
    size = os.path.getsize(named) if "{size}" in expected else None
    assert err.startswith(f"{script}.py: error: " + expected.format(a=assets, size=size)), err
    assert started == []


def test_validation_shorter_than_one_block_names_the_file(assets):
    import run_clm

    with pytest.raises(SystemExit) as e:
        run_clm.main(_argv(assets, _clm, ["--validation_file", "{a}/short.txt", "--train_file", None,
                                          "--num_train_epochs", 0]) + ["--no_losparse"])
    assert str(e.value) == (f"run_clm.py: error: --validation_file {assets}/short.txt has fewer tokens than one block "
                            "of --block_size 8")


def test_command_line_error_is_one_line_without_traceback(assets):
    proc = run_script("run_glue.py", _argv(assets, _glue, ["--output_dir", "{a}/a_file/out"]), extra_env=ENV,
                      timeout=600)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"run_glue.py: error: --output_dir {assets}/a_file/out: cannot "
                                                    "be created or written (Not a directory)")
    assert "Running training" not in proc.stderr


# ----------------------------------------------------------------------------------------------------
# Atomic checkpoints and the latest complete one
# ----------------------------------------------------------------------------------------------------
def test_save_state_atomic_and_latest_checkpoint(tmp_path, caplog):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    out = tmp_path / "out"
    for step in (2, 4):
        utils.save_state_atomic(accelerator, str(out / f"step_{step}"))
    assert sorted(os.listdir(out)) == ["step_2", "step_4"]  # no .incomplete folder left
    files = json.loads((out / "step_4" / utils.CHECKPOINT_MARKER).read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(files)
    assert all(files[f] == (out / "step_4" / f).stat().st_size for f in files)
    # the same name again (epoch_N after a resume) replaces the folder
    utils.save_state_atomic(accelerator, str(out / "step_4"))
    assert sorted(os.listdir(out)) == ["step_2", "step_4"]

    (out / "step_6.incomplete").mkdir()  # stopped while written by save_state_atomic
    (out / "step_8").mkdir()  # stopped while written by a plain save_state: no marker
    (out / "step_8" / "model.safetensors").write_bytes(b"x")
    os.remove(out / "step_4" / "optimizer.bin")  # damaged afterwards
    with caplog.at_level("WARNING", logger="losparse"):
        assert utils.latest_checkpoint(str(out)) == str(out / "step_2")
    skipped = "\n".join(r.getMessage() for r in caplog.records)
    assert f"skipping {out / 'step_6.incomplete'}: its write did not finish" in skipped
    assert f"skipping {out / 'step_8'}: no losparse_checkpoint.json" in skipped
    assert f"skipping {out / 'step_4'}: optimizer.bin is missing" in skipped
    assert utils.latest_checkpoint(str(tmp_path / "missing")) is None
    # a folder an earlier version wrote with a plain save_state (no marker) is taken when its files are all there
    for f in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        (out / "step_10").mkdir(exist_ok=True)
        (out / "step_10" / f).write_bytes(b"x")
    caplog.clear()
    with caplog.at_level("WARNING", logger="losparse"):
        assert utils.latest_checkpoint(str(out)) == str(out / "step_10")
        utils.check_resume_folder(str(out / "step_10"))
    assert "written before checkpoints were atomic" in caplog.text
    with pytest.raises(utils.RunInputError, match="step_8: not a complete checkpoint: .*no optimizer.bin"):
        utils.check_resume_folder(str(out / "step_8"))


# ----------------------------------------------------------------------------------------------------
# Ctrl-C while a checkpoint is written, and while training
# ----------------------------------------------------------------------------------------------------
# One child process runs run_glue.main() several times: first without interruption, then a chain of runs into another
# folder, each stopped by a real SIGINT (the child sends it to itself from a hook, so the point is exact) and
# continued with --resume_from_checkpoint latest. A save_state writes (with accelerate.checkpointing.save) the
# model, optimizer, scheduler, then the registered objects (TrainState, Pruner).
CHILD = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import accelerate
import accelerate.checkpointing as ackpt
from accelerate.state import AcceleratorState, GradientState
import losparse.runs
import run_glue, utils

plan = json.loads(sys.argv[2])
state = {"kill": None, "count": 0}
# A shell without job control starts background jobs with SIGINT ignored, and children inherit that: restore
# Python's own handler so that the SIGINT below is a Ctrl-C wherever the suite runs.
signal.signal(signal.SIGINT, signal.default_int_handler)

def hit(where, name):
    kill = state["kill"]
    if kill and kill["where"] == where and kill.get("folder") in (None, name):
        state["count"] += 1
        if state["count"] == kill["call"]:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: KeyboardInterrupt at the next bytecode, i.e. here

orig_save, orig_finish, orig_backward = ackpt.save, losparse.runs._finish_checkpoint, accelerate.Accelerator.backward
def save(obj, f, *a, **k):
    hit("save", os.path.basename(os.path.dirname(str(f))))  # before the file is written
    return orig_save(obj, f, *a, **k)
def finish(tmp, out):
    hit("finish", os.path.basename(out))  # every file written, no marker yet, not renamed
    return orig_finish(tmp, out)
def backward(self, loss, **k):
    hit("train", None)
    return orig_backward(self, loss, **k)
ackpt.save, losparse.runs._finish_checkpoint, accelerate.Accelerator.backward = save, finish, backward

for run in plan["runs"]:
    state.update(kill=run["kill"], count=0)
    losparse.runs._LAST_CHECKPOINT.clear()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    print("=== run", flush=True)
    print("=== run", file=sys.stderr, flush=True)
    argv = plan["args"] + ["--output_dir", run["out"]]
    argv += ["--resume_from_checkpoint", "latest"] if run["resume"] else []
    try:
        with utils.one_line_errors("run_glue.py"):
            run_glue.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    print("=== result " + json.dumps({"code": code, "listing": sorted(os.listdir(run["out"]))}), flush=True)
"""


def test_ctrl_c_while_saving_or_training_then_resume_is_exact(assets, tmp_path):
    args = ["--model_name_or_path", assets / "bert", "--train_file", assets / "train.csv", "--validation_file",
            assets / "train.csv", "--max_train_steps", 8, "--per_device_train_batch_size", 4,
            "--per_device_eval_batch_size", 24, "--learning_rate", 1e-2, "--seed", 5, "--checkpointing_steps", 2,
            "--low_rank_parameter_ratio", 0.1875, "--final_threshold", 0.2, "--warmup_steps", 1,
            "--initial_warmup", 1, "--final_warmup", 2, "--deltaT", 2]
    ref, out = tmp_path / "uninterrupted", tmp_path / "interrupted"
    runs = [
        {"out": ref, "resume": False, "kill": None},
        # step_2 done; Ctrl-C in step_4's write after model.safetensors, before optimizer.bin (the issue's case)
        {"out": out, "resume": False, "kill": {"where": "save", "folder": "step_4.incomplete", "call": 2}},
        # resumes from step_2; Ctrl-C in step_6's write between the registered objects (TrainState, Pruner)
        {"out": out, "resume": True, "kill": {"where": "save", "folder": "step_6.incomplete", "call": 5}},
        # resumes from step_4; Ctrl-C when step_6's files are all written but not yet marked complete
        {"out": out, "resume": True, "kill": {"where": "finish", "folder": "step_6", "call": 1}},
        # resumes from step_4; Ctrl-C while training step 7 (step_6 was completed in this run)
        {"out": out, "resume": True, "kill": {"where": "train", "call": 3}},
        # resumes from step_6 and finishes
        {"out": out, "resume": True, "kill": None},
    ]
    env = dict(os.environ, **ENV, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    plan = {"args": [str(a) for a in args], "runs": [dict(r, out=str(r["out"])) for r in runs]}
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO), json.dumps(plan)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)  # a hang guard: about a minute idle
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the Ctrl-C child (6 tiny run_glue.py runs) did not finish in {e.timeout} s")
    assert proc.returncode == 0, proc.stderr[-6000:]
    outs = proc.stdout.split("=== run\n")[1:]
    errs = proc.stderr.split("=== run\n")[1:]
    assert len(outs) == len(errs) == 6, proc.stdout[-3000:]
    results = [json.loads(o.split("=== result ")[1].splitlines()[0]) for o in outs]
    resumed = [next((l.split(": ", 1)[1] for l in o.splitlines() if l.startswith("Resumed from checkpoint")), None)
               for o in outs]
    last_err = [e.strip().splitlines()[-1] for e in errs]

    assert [r["code"] for r in results] == [0, 130, 130, 130, 130, 0]
    assert resumed == [None, None, str(out / "step_2"), str(out / "step_4"), str(out / "step_4"), str(out / "step_6")]
    assert results[1]["listing"] == ["step_2", "step_4.incomplete"]
    assert last_err[1] == f"run_glue.py: interrupted; the last complete checkpoint is {out / 'step_2'} " \
                          "(--resume_from_checkpoint latest continues from it)"
    assert f"skipping {out / 'step_4.incomplete'}: its write did not finish" in errs[2]
    assert results[2]["listing"] == ["step_2", "step_4", "step_6.incomplete"]
    assert results[3]["listing"] == ["step_2", "step_4", "step_6.incomplete"]
    assert last_err[3] == "run_glue.py: interrupted; no checkpoint was completed in this run"
    assert results[4]["listing"] == ["step_2", "step_4", "step_6"]
    assert last_err[4].startswith(f"run_glue.py: interrupted; the last complete checkpoint is {out / 'step_6'} ")
    assert results[5]["listing"] == results[0]["listing"]
    assert "step_8" in results[5]["listing"] and "pytorch_model.bin" in results[5]["listing"]
    assert all("Traceback" not in e for e in errs)

    a = torch.load(ref / "pytorch_model.bin", map_location="cpu", weights_only=True)
    b = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert a.keys() == b.keys() and any(k.endswith("sparse.weight") for k in a)
    assert any((a[k] == 0).all(dim=1).any() for k in a if k.endswith("sparse.weight"))  # pruned rows to compare
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
    assert json.loads((out / "all_results.json").read_text())["train_steps"] == 8
