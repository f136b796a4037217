"""Shared fixtures: tiny BERT / DeBERTa-v2 / BART models with a tokenizer, saved to a temp dir, offline."""
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = (
    "the a an of to in on at is was are be and or not no yes it this that what where who when why how "
    "which cat dog mat movie film good bad great terrible fine awful love hate sat ran city paris france "
    "london river bank money year people man woman child day night red blue green big small new old "
    "capital country first last one two three four five he she they we you i his her their our my "
    "summary text news said says today report sentence question answer context title"
).split()
VOCAB = (
    _SPECIAL
    + list(string.punctuation)
    + list(string.ascii_lowercase)
    + list(string.digits)
    + ["##" + c for c in string.ascii_lowercase + string.digits]
    + _WORDS
)


def make_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(VOCAB))}, model_max_length=128)


def tiny_config(kind, num_labels=2, **overrides):
    """Tiny configs. ``kind`` is one of ``bert``, ``deberta``, ``bart``."""
    from transformers import BartConfig, BertConfig, DebertaV2Config

    vocab_size = len(dict.fromkeys(VOCAB))
    if kind == "bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    elif kind == "deberta":
        cfg = DebertaV2Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=128, relative_attention=True,
                              position_buckets=32, pos_att_type=["p2c", "c2p"], num_labels=num_labels,
                              type_vocab_size=0, position_biased_input=False)
    elif kind == "bart":
        cfg = BartConfig(vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, max_position_embeddings=160, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3, decoder_start_token_id=3, forced_bos_token_id=None,
                         forced_eos_token_id=3, num_labels=num_labels)
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_tiny_model(kind, head="seq_cls", num_labels=2, seed=0):
    """Return a randomly initialised tiny model. ``head``: seq_cls | qa | seq2seq | base."""
    import torch
    from transformers import (AutoModel, AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification)

    torch.manual_seed(seed)
    cfg = tiny_config(kind, num_labels=num_labels)
    cls = {"seq_cls": AutoModelForSequenceClassification, "qa": AutoModelForQuestionAnswering,
           "seq2seq": AutoModelForSeq2SeqLM, "base": AutoModel}[head]
    return cls.from_config(cfg)


def save_tiny_model(path, kind, head="seq_cls", num_labels=2, seed=0):
    path = Path(path)
    model = build_tiny_model(kind, head, num_labels, seed)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def losparse_layers_from_state_dict(sd):
    """Shapes, ranks and kept rows of every LoSparse layer of an original-layout (or compacted) state dict."""
    layers = []
    for k in sorted(sd):
        if not k.endswith(".left.weight"):
            continue
        p = k[: -len("left.weight")]
        if p + "sparse.weight" in sd:
            rows = int((sd[p + "sparse.weight"] != 0).any(dim=1).sum())
        else:
            rows = int(sd[p + "sparse_weight_pruned"].shape[0])
        layers.append({"name": p[:-1], "out": sd[k].shape[0], "rank": sd[k].shape[1],
                       "in": sd[p + "right.weight"].shape[1], "rows": rows})
    return layers


def losparse_ratios(layers):
    """``(low-rank ratio, kept fraction of S, one row per layer)`` of the substituted matrices, each over their
    dense size. The pruner keeps the final fraction of S within one row per layer (the last ``tol``)."""
    dense = sum(l["out"] * l["in"] for l in layers)
    low = sum(l["rank"] * (l["out"] + l["in"]) for l in layers) / dense
    sparse = sum(l["rows"] * l["in"] for l in layers) / dense
    one_row_per_layer = sum(l["in"] for l in layers) / dense
    return low, sparse, one_row_per_layer


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory: ``tiny_model_dir(kind, head="seq_cls", num_labels=2)`` -> directory with model + tokenizer."""

    def _make(kind, head="seq_cls", num_labels=2, seed=0):
        return save_tiny_model(tmp_path / f"{kind}-{head}-{num_labels}-{seed}", kind, head, num_labels, seed)

    return _make


_BASE_ENV = dict(os.environ)  # as the session started: what the fork server imports with (no test changed it yet)


def _script_env(base, extra_env):
    env = dict(base)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "WANDB_DISABLED": "true",
                "CUDA_VISIBLE_DEVICES": ""})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra_env or {})
    return env


def run_script(script, args, cwd=None, timeout=900, extra_env=None):
    """Run one of the repo's example scripts with the current interpreter, offline. Returns CompletedProcess.

    The run is a child of a fork server that has imported torch, transformers and datasets once (see
    tests/_script_server.py: the same process, exit code and output as ``python script args``, seconds less of
    imports). ``LOSPARSE_TEST_FORK=0``, or an environment that differs from the server's where a library reads it
    at import, runs a fresh interpreter instead."""
    env = _script_env(os.environ, extra_env)
    cmd = [sys.executable, str(REPO / script)] + [str(a) for a in args]
    if _FORK_SERVER.usable(env):
        try:
            return _FORK_SERVER.run(cmd, cwd or REPO, env, timeout)
        except RuntimeError:  # the server itself ended (killed): a fresh interpreter; the next run restarts it
            _FORK_SERVER.close()
    return subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)


# read at import by torch, transformers, datasets or Python itself: a run whose value differs from the server's
# environment gets a fresh interpreter (the server's child sets the handled ones itself)
_IMPORT_TIME = ("HF_", "HUGGINGFACE", "TRANSFORMERS_", "DATASETS_", "TORCH", "PYTORCH", "OMP_", "MKL_", "KMP_",
                "OPENBLAS", "GOMP", "PYTHON", "HOME", "XDG_", "LD_", "TOKENIZERS_", "CUDA", "TMP", "TEMP")
_HANDLED = {"HF_DATASETS_CACHE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "PYTHONUNBUFFERED"}
_RUNTIME = ("TORCHINDUCTOR_", "TRITON_")  # set by torch.compile in the test process itself, read when used


class _ForkServer:
    def __init__(self):
        self.proc, self.env, self.buf, self.by_imports = None, None, b"", set()
        self.disabled = os.environ.get("LOSPARSE_TEST_FORK", "1") == "0" or not hasattr(os, "fork")

    def usable(self, env):
        if self.disabled:
            return False
        if self.proc is None or self.proc.poll() is not None:
            if not self._start():
                return False
        ignored = _HANDLED | self.by_imports
        why = [key for key in set(env) | set(self.env) if env.get(key) != self.env.get(key) and key not in ignored
               and key.upper().startswith(_IMPORT_TIME) and not key.upper().startswith(_RUNTIME)]
        threads = env.get("OMP_NUM_THREADS", "")
        if not threads.isdigit() or env.get("MKL_NUM_THREADS") not in (None, threads):
            why.append("OMP_NUM_THREADS/MKL_NUM_THREADS")
        if os.environ.get("LOSPARSE_TEST_FORK_LOG"):  # which runs could not fork, and why
            with open(os.environ["LOSPARSE_TEST_FORK_LOG"], "a") as f:
                f.write(f"{'fresh' if why else 'fork'} {os.getpid()} {sorted(why)}\n")
        return not why

    def _start(self):
        self.env, self.buf = _script_env(_BASE_ENV, None), b""
        try:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_script_server.py"))],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         env=self.env, cwd=REPO)
            # variables the server's imports set (the test process sets them too once it imports the same)
            self.by_imports = set(self._read(600)["set_by_imports"])
            return True
        except Exception:  # no server: fresh interpreters, as before
            self.close()
            self.disabled = True
            return False

    def _read(self, timeout):
        import json
        import select
        import time

        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the tests' fork server ended")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, cmd, cwd, env, timeout):
        import json
        import signal
        import tempfile

        with tempfile.TemporaryDirectory(prefix="losparse-run-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            req = {"script": cmd[1], "args": cmd[2:], "cwd": str(cwd), "env": env, "stdout": str(out),
                   "stderr": str(err)}
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            pid = self._read(60)["pid"]
            try:
                status = self._read(timeout)["status"]
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)
                self._read(60)
                raise subprocess.TimeoutExpired(cmd, timeout, output=out.read_text(errors="replace"),
                                                stderr=err.read_text(errors="replace"))
            return subprocess.CompletedProcess(cmd, status, out.read_text(), err.read_text())

    def close(self):
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
            self.proc = None


_FORK_SERVER = _ForkServer()


def pytest_unconfigure(config):
    _FORK_SERVER.close()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a real pretrained model (about a minute on CPU); CI runs it too. "
                                       "Skip with -m 'not slow'.")



# ----------------------------------------------------------------------------------------------------
# Scheduling over pytest-xdist workers (run_tests.sh: --dist loadscope --no-loadscope-reorder)
# ----------------------------------------------------------------------------------------------------
# Each test file goes whole to one worker (its module-scoped runs are trained once, not once per worker that gets one
# of its tests), and the files start longest first so that the two workers finish together. Seconds per file, from
# `bash run_tests.sh --durations=0` (2 workers on 2 busy vCPUs); only the order depends on them, a file not listed
# comes after these in collection order.
_EXPECTED_SECONDS = {
    "test_run_glue.py": 270, "test_quickstart_clm.py": 215, "test_run_qa.py": 155, "test_run_summarization.py": 145,
    "test_multi_process.py": 130, "test_quickstart.py": 115, "test_fsdp2.py": 110, "test_run_clm.py": 80,
    "test_fast_forward.py": 35, "test_remote_code.py": 23, "test_calibration.py": 130, "test_runs.py": 21,
    "test_run_gpu.py": 20, "test_train_forward.py": 15, "test_pruner.py": 8, "test_compile.py": 12,
    "test_script_runner.py": 30, "test_standalone.py": 40, "test_bench_scale.py": 17,
}


def pytest_collection_modifyitems(config, items):
    """Longest test files first; the tests of a file keep their order and stay together (a stable sort)."""
    items.sort(key=lambda item: -_EXPECTED_SECONDS.get(item.path.name, 0))
