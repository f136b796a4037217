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
# Scheduling over pytest-xdist workers (run_tests.sh: --dist loadgroup --no-loadscope-reorder)
# ----------------------------------------------------------------------------------------------------
# Tests that share an expensive module-scoped run go to the same worker (an xdist_group): otherwise each worker that
# gets one of them trains the run again. Keyed by test file, then by the fixture the tests use.
_SHARED_RUNS = {
    "test_run_summarization.py": {"trained": "summarization-trained"},
    "test_run_clm.py": {"trained": "clm-trained", "generation_models": "clm-generation"},
    "test_remote_code.py": {"exported": "remote-code-exported"},
    "test_multi_process.py": {"runs": "multi-process-runs"},
    "test_fsdp2.py": {"glue": "fsdp2-glue"},
    "test_run_glue.py": {"baseline": "glue-bert-single", "uninterrupted": "glue-resume"},
}
# test_run_glue.py's `runs` trains the CASES table lazily, one run per case: one group per case it reads.
_GLUE_RUNS_OF = {"test_checkpoint_that_does_not_fit_names_the_keys[wrong_head]": "bert-pair",
                 "test_checkpoint_that_does_not_fit_names_the_keys[wrong_base_model]": "deberta-pair",
                 "test_distillation_from_stored_pruned_model": "bert-single",
                 "test_distillation_loss_is_task_plus_weighted_kd_terms": "bert-single"}
# Seconds a test (or, summed, a group) takes, from `bash run_tests.sh --durations=0` (2 workers, 2 busy cores):
# the longest ones start first so that the two workers finish together. Only the order depends on these figures.
_EXPECTED_SECONDS = {
    "test_quickstart_clm.py::test_quickstart_clm_reduced_steps": 300,
    "test_quickstart.py::test_quickstart_reduced_steps": 260,
    "test_run_summarization.py::test_resume_from_step_checkpoint_is_exact_with_accumulation": 80,
    "test_multi_process.py::test_qa_evaluation_gathers_all_processes": 50,
    "test_run_qa.py::test_learns_the_first_word": 46,
    "test_run_qa.py::test_train_eval_then_eval_only_reproduces": 40,
    "test_run_summarization.py::test_learns_to_copy_the_first_sentence": 36,
    "test_run_clm.py::test_run_clm_fsdp2_matches_one_process": 37,
    "test_run_qa.py::test_resume_from_checkpoint_is_exact": 36,
    "test_run_qa.py::test_warmups_longer_than_the_run_and_v1_without_answers": 31,
    "test_multi_process.py::test_summarization_evaluation_gathers_all_processes": 29,
    "test_run_gpu.py::test_quick_run_covers_every_section": 27,
    "test_robustness.py::test_ctrl_c_while_saving_or_training_then_resume_is_exact": 25,
    "test_compile.py::test_inductor_fullgraph_bf16_bert_no_derivation_equals_eager_and_follows_a_refresh": 20,
}
_GROUP_SECONDS = {"glue-bert-single": 150, "multi-process-runs": 90, "summarization-trained": 75, "fsdp2-glue": 75,
                  "glue-resume": 50, "glue-deberta-pair": 40, "glue-bert-pair": 35, "glue-bert-regression": 30,
                  "glue-deberta-single-bf16": 30, "glue-deberta-stsb": 30, "remote-code-exported": 23,
                  "clm-trained": 20}


def _xdist_group(item):
    module = item.path.name
    names = item.fixturenames
    for fixture, group in _SHARED_RUNS.get(module, {}).items():
        if fixture in names:
            return group
    if module == "test_run_glue.py" and "runs" in names:
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("name") if callspec is not None else None
        # a test not in the table shares the runs of all of them (correct, only less parallel)
        return "glue-" + (case or _GLUE_RUNS_OF.get(item.name) or _GLUE_RUNS_OF.get(item.originalname, "runs"))
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist appends the group names to the node ids
def pytest_collection_modifyitems(config, items):
    """Put the tests that share a module-scoped run into one xdist group, and the longest tests and groups first
    (a stable sort: the rest keep the collection order)."""
    cost = {}
    for item in items:
        group = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
            cost[item] = ("group", group)
        else:
            key = f"{item.path.name}::{item.originalname}"
            cost[item] = ("test", key)
    seconds = {item: (_GROUP_SECONDS.get(name, 1) if kind == "group" else _EXPECTED_SECONDS.get(name, 0))
               for item, (kind, name) in cost.items()}
    first = {}
    for i, item in enumerate(items):  # a group sorts as one unit, at the place of its first test
        first.setdefault(cost[item], i)
    items.sort(key=lambda item: (-seconds[item], first[cost[item]]))
