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


def run_script(script, args, cwd=None, timeout=900, extra_env=None):
    """Run one of the repo's example scripts with the current interpreter, offline. Returns CompletedProcess."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "WANDB_DISABLED": "true",
                "CUDA_VISIBLE_DEVICES": ""})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra_env or {})
    cmd = [sys.executable, str(REPO / script)] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)


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
    "test_fast_forward.py": 35, "test_remote_code.py": 23, "test_calibration.py": 130, "test_robustness.py": 21,
    "test_run_gpu.py": 20, "test_train_forward.py": 15, "test_utils.py": 14, "test_compile.py": 12,
}


def pytest_collection_modifyitems(config, items):
    """Longest test files first; the tests of a file keep their order and stay together (a stable sort)."""
    items.sort(key=lambda item: -_EXPECTED_SECONDS.get(item.path.name, 0))
