"""A fork server for the tests' script runs (``conftest.run_script``): saves the imports of every run.

Importing torch, transformers, datasets and accelerate takes 5-15 s of a script run on 2 vCPUs, and the suite starts
the example scripts about a hundred times. This process imports them once (with the environment every run of
``run_script`` starts from) and then, for each request, forks a child that runs the script exactly as
``python script.py args`` would: its own process (and session, so a hung run is killed whole), its own stdout/stderr
files, environment, working directory, ``sys.argv`` and ``sys.path[0]``, ``__name__ == "__main__"``, the exit code
of ``sys.exit`` (1 and a traceback for an uncaught exception), atexit handlers run at its exit. Nothing of a test
reaches it: it is started from the environment ``conftest`` saw at import, before any test ran, and the child
resets what an import reads from the environment that a run may change (the datasets cache, torch's threads).

Protocol (one request at a time, JSON lines): the client writes ``{"script", "args", "cwd", "env", "stdout",
"stderr"}``; the server answers ``{"pid": N}`` once the child runs, then ``{"status": code}`` when it has ended
(``-signal`` if killed). End of input ends the server.
"""
import importlib
import json
import os
import sys

SET_BY_IMPORTS = {}
PRELOAD = ["numpy", "torch", "torch.nn.functional", "torch.distributed", "torch.utils.data", "datasets", "transformers",
           "accelerate", "accelerate.logging", "accelerate.utils", "safetensors.torch", "tqdm.auto", "sklearn.metrics",
           "scipy.stats", "utils", "utils_qa"]
# model classes transformers imports lazily: the ones the tests' tiny models use
LAZY = ["AutoConfig", "AutoTokenizer", "AutoModelForSequenceClassification", "AutoModelForQuestionAnswering",
        "AutoModelForSeq2SeqLM", "AutoModelForCausalLM", "DataCollatorWithPadding", "DataCollatorForSeq2Seq",
        "get_scheduler", "BertForSequenceClassification", "BertForQuestionAnswering", "BertTokenizer",
        "BertTokenizerFast", "DebertaV2ForSequenceClassification", "DebertaV2ForQuestionAnswering",
        "BartForConditionalGeneration", "LlamaForCausalLM", "Qwen2ForCausalLM", "PreTrainedTokenizerFast"]


def _preload():
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional package missing: the run imports it (or fails) as it would anyway
            pass
    try:
        import transformers

        for name in LAZY:
            getattr(transformers, name, None)
    except Exception:
        pass


def _child(req):
    """Runs in the forked child; never returns (ends the process through SystemExit)."""
    code = 1
    try:
        os.setsid()
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            new = os.open(path, flags, 0o644)
            os.dup2(new, fd)
            os.close(new)
        sys.stdin = open(0, closefd=False)  # the old objects wrote to the server's pipes through fds 0-2
        sys.stdout = open(1, "w", closefd=False, buffering=1 if req["env"].get("PYTHONUNBUFFERED") else -1)
        sys.stderr = open(2, "w", closefd=False, buffering=1, errors="backslashreplace")
        os.environ.clear()
        os.environ.update(req["env"])
        for key, value in SET_BY_IMPORTS.items():
            os.environ.setdefault(key, value)
        os.chdir(req["cwd"])
        script = os.path.abspath(req["script"])
        sys.argv = [script] + list(req["args"])
        extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(script)] + extra + [p for p in sys.path[1:] if p not in extra]
        if "datasets" in sys.modules and "HF_DATASETS_CACHE" in req["env"]:  # read at import: set as a fresh one would
            from pathlib import Path

            cfg = sys.modules["datasets"].config
            cfg.HF_DATASETS_CACHE = Path(os.path.expanduser(req["env"]["HF_DATASETS_CACHE"]))
            cfg.DOWNLOADED_DATASETS_PATH = cfg.HF_DATASETS_CACHE / cfg.DOWNLOADED_DATASETS_DIR
            cfg.EXTRACTED_DATASETS_PATH = cfg.DOWNLOADED_DATASETS_PATH / cfg.EXTRACTED_DATASETS_DIR
        if "torch" in sys.modules and req["env"].get("OMP_NUM_THREADS", "").isdigit():
            sys.modules["torch"].set_num_threads(int(req["env"]["OMP_NUM_THREADS"]))
        import runpy

        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
    except BaseException:  # as the interpreter does for an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    raise SystemExit(code)


def main():
    before = dict(os.environ)
    _preload()
    # what the imports themselves put in the environment (scikit-learn sets KMP_* variables): a fresh interpreter
    # would have them after the same imports, so every child gets them back after taking its run's environment
    global SET_BY_IMPORTS
    SET_BY_IMPORTS = {k: v for k, v in os.environ.items() if before.get(k) != v}
    sys.stdout.write(json.dumps({"ready": os.getpid(), "set_by_imports": SET_BY_IMPORTS}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
