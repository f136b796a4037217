#!/usr/bin/env python
# coding=utf-8
# Adapted from Hugging Face's examples/pytorch/summarization/run_summarization_no_trainer.py (Apache-2.0),
# with the three LoSparse hooks of the original LoSparse repository.
"""Fine-tune (and compress with LoSparse) a seq2seq model such as BART on summarization, without Trainer.

    python run_summarization.py --model_name_or_path facebook/bart-large --dataset_name xsum \
        --low_rank_parameter_ratio 0.35 --final_threshold 0.05 --deltaT 100 --num_beams 6 --output_dir out

Evaluation generates with ``--num_beams`` and scores ROUGE-1/2/L/Lsum with ``rouge-score`` (stemming on, mean
F-measure x 100), fully offline: ROUGE-Lsum's sentence splitting uses nltk's punkt when its data is installed
and otherwise a data-free splitter (:func:`split_sentences_regex`). ``nltk.download`` is never called.
"""

import argparse
import functools
import json
import logging
import math
import os
import random
import re
import sys
import time

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from datasets import load_dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import transformers
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    SchedulerType,
    get_scheduler,
)

import utils

logger = get_logger(__name__)

MODEL_TYPES = tuple(CONFIG_MAPPING.keys())  # (HF uses MODEL_MAPPING.keys(), which imports every config: ~3 s)

summarization_name_mapping = {
    "amazon_reviews_multi": ("review_body", "review_title"),
    "big_patent": ("description", "abstract"),
    "cnn_dailymail": ("article", "highlights"),
    "abisee/cnn_dailymail": ("article", "highlights"),
    "orange_sum": ("text", "summary"),
    "pn_summary": ("article", "summary"),
    "psc": ("extract_text", "summary_text"),
    "samsum": ("dialogue", "summary"),
    "thaisum": ("body", "summary"),
    "xglue": ("news_body", "news_title"),
    "xsum": ("document", "summary"),
    "EdinburghNLP/xsum": ("document", "summary"),
    "wiki_summary": ("article", "highlights"),
}

# STEP 1 lists of the original (BART: q_proj/k_proj/v_proj/out_proj/fc1/fc2). BART's lm_head is tied to the
# shared embeddings and matches no entry, so it stays dense.
ALLOW_NAME = ["query", "key", "value", "q_proj", "k_proj", "v_proj", "out_proj", "dense", "attention",
              "fc1", "fc2", "query_proj", "key_proj", "value_proj"]
BLOCK_NAME = ["pooler", "classifier", "LayerNorm", "embeddings"]

CHECKPOINT_DIR = re.compile(r"^(step|epoch)_(\d+)$")  # folders written by --checkpointing_steps
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SENTENCE_SPLITTERS = ("auto", "nltk", "regex")


# ----------------------------------------------------------------------------------------------------
# Sentence splitting for ROUGE-Lsum (offline)
# ----------------------------------------------------------------------------------------------------
_CLOSERS = "\"'”’»)]}"
_OPENERS = "\"'“‘«([{"
# Never end a sentence: titles before a name, and abbreviations followed by more of the same sentence.
_NEVER_END = {
    "mr", "mrs", "ms", "messrs", "mme", "mlle", "dr", "prof", "rev", "hon", "sen", "rep", "gov", "gen", "lt",
    "col", "capt", "cpl", "sgt", "maj", "adm", "cmdr", "pres", "supt", "insp", "det", "e.g", "i.e", "cf", "vs",
    "viz", "approx", "fig", "figs", "vol", "pp",
}
# May end a sentence: split after them only when a capitalised common sentence opener follows.
_MAY_END = {
    "etc", "inc", "ltd", "co", "corp", "llc", "plc", "jr", "sr", "st", "ave", "rd", "blvd", "bros", "dept",
    "univ", "est", "al", "mt", "jan", "feb", "aug", "sep", "sept", "oct", "nov", "dec",
}
_STARTERS = {
    "the", "a", "an", "it", "its", "he", "she", "they", "we", "i", "you", "his", "her", "their", "our", "my",
    "your", "this", "that", "these", "those", "there", "here", "but", "and", "or", "so", "yet", "however",
    "in", "on", "at", "after", "before", "when", "while", "if", "as", "for", "from", "with", "by", "to",
    "some", "many", "most", "all", "both", "each", "every", "no", "not", "one", "two", "what", "who", "why",
    "how", "where", "then", "now", "also", "meanwhile", "still", "since", "although", "though", "other",
    "another", "last", "next", "later", "earlier", "today", "yesterday", "police", "officials",
    "mr", "mrs", "ms", "dr",
}
_INITIALISM = re.compile(r"^(?:[A-Za-z]{1,2}\.)+[A-Za-z]{1,2}$")  # U.S, a.m, p.m, Ph.D (final period removed)
_CANDIDATE = re.compile(r"(…|[.!?]+)([" + re.escape(_CLOSERS) + r"]*)(?=\s)")


def _is_boundary(text, m):
    """Decide whether the terminal punctuation matched by ``m`` ends a sentence."""
    punct, closers = m.group(1), m.group(2)
    after = text[m.end():].lstrip()
    next_word = after.split(None, 1)[0].lstrip(_OPENERS) if after else ""
    next_upper = next_word[:1].isupper()
    if "?" in punct or "!" in punct:
        # '"Why?" he asked.' continues the sentence; 'Why? He asked.' does not.
        return not (any(c in "\"'”’»" for c in closers) and next_word[:1].islower())
    if punct == "…" or len(punct) >= 2:  # ellipsis: a new sentence only if a capitalised word follows
        return next_upper
    token = re.search(r"\S*$", text[:m.start()]).group(0)  # the word the period is attached to
    if closers == "" and token[-1:] and token[-1] in _CLOSERS:
        return True  # "(about 10 p.m.)." : the period after a bracket is terminal
    word = token.lstrip(_OPENERS)
    low = word.lower()
    if low in _NEVER_END:
        return False
    if low == "no" and next_word[:1].isdigit():  # "No. 10"
        return False
    if low in _MAY_END or _INITIALISM.match(word) or re.fullmatch(r"[A-Za-z]", word):
        return next_upper and next_word.lower().rstrip(",;:.") in _STARTERS
    return True


def split_sentences_regex(text):
    """Data-free sentence splitter (the fallback when nltk's punkt data is not installed).

    Splits after ``.``, ``!``, ``?`` and ellipses followed by whitespace, keeping closing quotes/brackets with
    the sentence they close, and at newlines. A period does not end a sentence after a title (``Dr.``,
    ``Mr.``, ``Prof.``, ...), after ``e.g.``/``i.e.``/``vs.``, or in ``No. 10``; after an abbreviation that can
    also end a sentence (``etc.``, ``Inc.``, ``St.``, ``U.S.``, ``p.m.``, single initials) it does only when a
    capitalised common sentence opener (``The``, ``It``, ``He``, ...) follows. Decimals (``3.5``) never split.
    An ellipsis ends a sentence when a capitalised word follows.
    """
    sentences = []
    for line in text.split("\n"):
        start = 0
        for m in _CANDIDATE.finditer(line):
            if _is_boundary(line, m):
                sentences.append(line[start:m.end()].strip())
                start = m.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]


@functools.lru_cache(maxsize=None)
def _punkt_sent_tokenize():
    """``nltk.sent_tokenize`` if the punkt data is installed and loads, else None. Never downloads."""
    try:
        import nltk
    except ImportError:
        return None
    for resource in ("tokenizers/punkt_tab/english/", "tokenizers/punkt"):
        try:
            nltk.data.find(resource)
        except (LookupError, OSError):
            continue
        try:
            nltk.sent_tokenize("Probe one. Probe two.")
        except Exception:  # e.g. only the old pickle is present and this nltk refuses pickles
            continue
        return nltk.sent_tokenize
    return None


def resolve_sentence_splitter(name="auto"):
    """``auto`` -> ``nltk`` when punkt data is installed, else ``regex``. ``nltk`` without data is an error."""
    if name not in SENTENCE_SPLITTERS:
        raise ValueError(f"--sentence_splitter must be one of {SENTENCE_SPLITTERS}, got {name!r}")
    if name == "regex":
        return "regex"
    if _punkt_sent_tokenize() is not None:
        return "nltk"
    if name == "nltk":
        raise LookupError("--sentence_splitter nltk: nltk's punkt data (tokenizers/punkt_tab) is not installed; "
                          "install it where you have network access, or use --sentence_splitter regex")
    return "regex"


def split_sentences(text, splitter="auto"):
    """Split ``text`` into sentences with punkt (``nltk``), the fallback (``regex``) or the best available."""
    if resolve_sentence_splitter(splitter) == "nltk":
        return [s for line in text.split("\n") for s in _punkt_sent_tokenize()(line)]
    return split_sentences_regex(text)


def postprocess_text(preds, labels, splitter="auto"):
    """Strip, and put one sentence per line (ROUGE-Lsum expects newline-separated sentences)."""
    preds = ["\n".join(split_sentences(pred.strip(), splitter)) for pred in preds]
    labels = ["\n".join(split_sentences(label.strip(), splitter)) for label in labels]
    return preds, labels


def compute_rouge(predictions, references, splitter="auto", use_stemmer=True):
    """ROUGE-1/2/L/Lsum F-measure x 100, averaged over examples (``rouge_score``, Porter stemming on).

    Texts are split into sentences first (one per line; ROUGE-Lsum needs it, the others ignore newlines).
    ``evaluate``'s ``rouge`` reports the median of 1000 bootstrap resamples of this mean (random, unseeded);
    the plain mean is the quantity it estimates, and is deterministic.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    preds, refs = postprocess_text(list(predictions), list(references), splitter)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(preds, refs):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    n = max(1, len(preds))
    return {k: 100.0 * v / n for k, v in totals.items()}


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------
def _str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "y", "t"):
        return True
    if v.lower() in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Finetune a transformers model on a summarization task with LoSparse")
    parser.add_argument("--dataset_name", type=str, default=None,
                        help="The name of the dataset to use (via the datasets library), e.g. xsum or cnn_dailymail.")
    parser.add_argument("--dataset_config_name", "--dataset_config", type=str, default=None,
                        help="The configuration name of the dataset to use, e.g. 3.0.0 for cnn_dailymail.")
    parser.add_argument("--dataset_revision", type=str, default=None,
                        help="Hub revision of --dataset_name (e.g. refs/convert/parquet for a script-based dataset).")
    parser.add_argument("--train_file", type=str, default=None, help="A csv or a json(l) file with the training data.")
    parser.add_argument("--validation_file", type=str, default=None,
                        help="A csv or a json(l) file with the validation data.")
    parser.add_argument("--test_file", type=str, default=None,
                        help="A csv or a json(l) file with test data, decoded and scored after training "
                             "(--do_predict).")
    parser.add_argument("--do_predict", action="store_true",
                        help="After training, also generate and score the test split (--test_file or the hub's test).")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Truncate the training set (debugging).")
    parser.add_argument("--max_eval_samples", type=int, default=None,
                        help="Truncate the validation and test sets (debugging).")
    parser.add_argument("--ignore_pad_token_for_loss", type=_str2bool, nargs="?", const=True, default=True,
                        help="Ignore padded label tokens in the loss (labels padded with -100). Default true; "
                             "pass `--ignore_pad_token_for_loss false` to train on them.")
    parser.add_argument("--max_source_length", type=int, default=1024,
                        help="The maximum total input sequence length after tokenization; longer ones are truncated.")
    parser.add_argument("--source_prefix", type=str, default=None,
                        help="A prefix to add before every source text (useful for T5 models).")
    parser.add_argument("--preprocessing_num_workers", type=int, default=None,
                        help="The number of processes to use for the preprocessing.")
    parser.add_argument("--overwrite_cache", action="store_true",
                        help="Overwrite the cached training and evaluation sets")
    parser.add_argument("--max_target_length", type=int, default=128,
                        help="The maximum total sequence length for target text after tokenization (training).")
    parser.add_argument("--val_max_target_length", type=int, default=None,
                        help="The maximum length of validation targets, and the max_length of model.generate. "
                             "Defaults to --max_target_length.")
    parser.add_argument("--num_beams", type=int, default=6,
                        help="Number of beams used by model.generate in evaluation.")
    parser.add_argument("--pad_to_max_length", action="store_true",
                        help="If passed, pad all samples to `max_length`. Otherwise, dynamic padding is used.")
    parser.add_argument("--model_name_or_path", type=str, default=None,
                        help="Path to pretrained model or model identifier from huggingface.co/models.")
    parser.add_argument("--config_name", type=str, default=None,
                        help="Pretrained config name or path if not the same as model_name")
    parser.add_argument("--tokenizer_name", type=str, default=None,
                        help="Pretrained tokenizer name or path if not the same as model_name")
    parser.add_argument("--text_column", type=str, default=None,
                        help="The name of the column in the datasets containing the full texts (for summarization).")
    parser.add_argument("--summary_column", type=str, default=None,
                        help="The name of the column in the datasets containing the summaries (for summarization).")
    parser.add_argument("--use_slow_tokenizer", action="store_true",
                        help="If passed, will use a slow tokenizer (not backed by the 🤗 Tokenizers library).")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8,
                        help="Batch size (per device) for the training dataloader.")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=8,
                        help="Batch size (per device) for the evaluation dataloader.")
    parser.add_argument("--learning_rate", type=float, default=5e-5,
                        help="Initial learning rate (after the potential warmup period) to use.")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="Weight decay to use.")
    parser.add_argument("--num_train_epochs", type=int, default=3, help="Total number of training epochs to perform.")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="Total number of training steps to perform. If provided, overrides num_train_epochs.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1,
                        help="Number of updates steps to accumulate before performing a backward/update pass.")
    parser.add_argument("--lr_scheduler_type", type=SchedulerType, default="linear", help="The scheduler type to use.",
                        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                 "constant_with_warmup"])
    parser.add_argument("--num_warmup_steps", type=int, default=0,
                        help="Number of steps for the warmup in the lr scheduler.")
    parser.add_argument("--output_dir", type=str, default=None, help="Where to store the final model.")
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument("--model_type", type=str, default=None, help="Model type to use if training from scratch.",
                        choices=MODEL_TYPES)
    parser.add_argument("--checkpointing_steps", type=str, default=None,
                        help="Save the accelerator state (model, optimizer, scheduler, RNG, pruner) every n steps "
                             "(an integer) or at the end of every epoch ('epoch'), under --output_dir.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help="Continue training from a step_<n> or epoch_<i> folder written by --checkpointing_steps, "
                             "or 'latest' for the newest one in --output_dir (none yet: start from scratch).")
    parser.add_argument("--with_tracking", action="store_true",
                        help="Whether to enable experiment trackers for logging.")
    parser.add_argument("--report_to", type=str, default="all",
                        help='The integration to report the results and logs to ("tensorboard", "wandb", "comet_ml", '
                             '"clearml", ...; "all" = every installed one). Only with --with_tracking.')
    parser.add_argument("--sentence_splitter", type=str, default="auto", choices=list(SENTENCE_SPLITTERS),
                        help="Sentence splitter for ROUGE-Lsum: nltk's punkt (needs its data installed), the data-free "
                             "regex fallback, or auto (punkt when available).")

    # LoSparse flags shared by run_glue.py, run_qa.py and run_summarization.py.
    utils.add_losparse_args(parser)

    args = parser.parse_args(argv)
    try:
        utils.validate_losparse_args(args)
        _validate_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def _validate_args(args):
    """Check this script's flags before anything is loaded; messages name the flag."""
    will_train = (args.max_train_steps if args.max_train_steps is not None else args.num_train_epochs) > 0
    if args.dataset_name is None and args.train_file is None and args.validation_file is None:
        raise ValueError("need either --dataset_name or --train_file/--validation_file")
    if args.dataset_name is None:
        if will_train and args.train_file is None:
            raise ValueError("--train_file is required to train (or pass --num_train_epochs 0 to only evaluate)")
        if args.validation_file is None:
            raise ValueError("--validation_file is required: the model is evaluated on it")
        if args.do_predict and args.test_file is None:
            raise ValueError("--do_predict needs --test_file when no --dataset_name is given")
    for flag in ("train_file", "validation_file", "test_file"):
        path = getattr(args, flag)
        if path is None:
            continue
        if path.rsplit(".", 1)[-1] not in ("csv", "json", "jsonl"):
            raise ValueError(f"--{flag} should be a csv or a json/jsonl file, got {path}")
        if not os.path.isfile(path):
            raise ValueError(f"--{flag} {path} does not exist")
    for flag in ("max_source_length", "max_target_length", "num_beams", "per_device_train_batch_size",
                 "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("val_max_target_length", "max_train_samples", "max_eval_samples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("num_train_epochs", "num_warmup_steps", "weight_decay"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.max_train_steps is not None and args.max_train_steps < 0:
        raise ValueError(f"--max_train_steps must be >= 0, got {args.max_train_steps}")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}")
    cs = args.checkpointing_steps
    if cs is not None and cs != "epoch" and not (cs.isdigit() and int(cs) > 0):
        raise ValueError(f"--checkpointing_steps must be a positive integer or 'epoch', got {cs!r}")
    resume = args.resume_from_checkpoint
    if resume == "latest":
        if args.output_dir is None:
            raise ValueError("--resume_from_checkpoint latest needs --output_dir")
    elif resume is not None and not os.path.isdir(resume):
        raise ValueError(f"--resume_from_checkpoint {resume} is not a directory")
    elif resume is not None and not CHECKPOINT_DIR.match(os.path.basename(os.path.normpath(resume))):
        raise ValueError("--resume_from_checkpoint must be a step_<n> or epoch_<i> folder written by "
                         f"--checkpointing_steps (or 'latest'), got {resume}")
    if args.eval_checkpoint is not None:
        if not os.path.exists(args.eval_checkpoint):
            raise ValueError(f"--eval_checkpoint {args.eval_checkpoint} does not exist")
        if will_train:
            raise ValueError("--eval_checkpoint evaluates a saved checkpoint without training: pass "
                             "--num_train_epochs 0 (and no --max_train_steps)")
    if args.model_name_or_path is None and args.model_type is None:
        raise ValueError("need --model_name_or_path (or --model_type with --tokenizer_name to train from scratch)")
    if args.with_tracking and args.output_dir is None:
        raise ValueError("--with_tracking needs --output_dir (the trackers' logging directory)")


# ----------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------
def preprocess_function(examples, tokenizer, text_column, summary_column, prefix="", max_source_length=1024,
                        max_target_length=128, padding=False, ignore_pad_token_for_loss=True):
    """Tokenize a batch: ``input_ids``/``attention_mask`` of ``prefix + text`` and ``labels`` of the summary.

    With ``padding="max_length"`` and ``ignore_pad_token_for_loss`` padded label positions become -100 (dynamic
    padding gets -100 from the collator). Only the keys a seq2seq model takes are returned (BERT-style
    tokenizers also produce ``token_type_ids``).
    """
    inputs = [prefix + (inp or "") for inp in examples[text_column]]
    targets = [tgt or "" for tgt in examples[summary_column]]
    enc = tokenizer(inputs, max_length=max_source_length, padding=padding, truncation=True)
    # Tokenize targets with the `text_target` keyword argument
    labels = tokenizer(text_target=targets, max_length=max_target_length, padding=padding, truncation=True)
    label_ids = labels["input_ids"]
    # If we are padding here, replace all tokenizer.pad_token_id in the labels by -100 when we want to ignore
    # padding in the loss.
    if padding == "max_length" and ignore_pad_token_for_loss:
        label_ids = [[(l if l != tokenizer.pad_token_id else -100) for l in label] for label in label_ids]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": label_ids}


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------
def generate_and_score(model, dataloader, accelerator, tokenizer, args):
    """Generate with ``--num_beams`` (under the accelerator's autocast) and score ROUGE; returns (scores, preds)."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    gen_kwargs = {"max_length": args.val_max_target_length, "num_beams": args.num_beams,
                  "synced_gpus": any(utils.is_sharded(p) for p in unwrapped.parameters())}  # FSDP2: same steps
    predictions, references, gen_lens = [], [], []
    for batch in dataloader:
        with torch.no_grad(), accelerator.autocast():
            generated_tokens = unwrapped.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                                  **gen_kwargs)
        generated_tokens = accelerator.pad_across_processes(generated_tokens, dim=1, pad_index=tokenizer.pad_token_id)
        labels = batch["labels"]
        if not args.pad_to_max_length:
            labels = accelerator.pad_across_processes(labels, dim=1, pad_index=tokenizer.pad_token_id)
        generated_tokens, labels = accelerator.gather_for_metrics((generated_tokens, labels))
        generated_tokens = generated_tokens.cpu().numpy()
        labels = labels.cpu().numpy()
        # Replace -100 in the labels as we can't decode them.
        labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
        gen_lens += np.count_nonzero(generated_tokens != tokenizer.pad_token_id, axis=1).tolist()
        predictions += [p.strip() for p in tokenizer.batch_decode(generated_tokens, skip_special_tokens=True)]
        references += [r.strip() for r in tokenizer.batch_decode(labels, skip_special_tokens=True)]
    scores = compute_rouge(predictions, references, splitter=args.sentence_splitter)
    scores["gen_len"] = float(np.mean(gen_lens)) if gen_lens else 0.0
    return scores, predictions


def _fmt(scores):
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())


def _latest_checkpoint(output_dir):
    """The most recently completed ``step_<n>`` / ``epoch_<i>`` folder in ``output_dir``, or None (incomplete ones,
    from a run stopped while writing them, are skipped with a warning)."""
    return utils.latest_checkpoint(output_dir, CHECKPOINT_DIR.pattern)


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def main():
    args = parse_args()
    # Paths and files first (seconds): a run that cannot read its data or write its results stops before training.
    utils.check_run_paths(args)

    # Initialize the accelerator. It handles device placement, mixed precision (`accelerate launch
    # --mixed_precision bf16`), distributed training and the trackers.
    accelerator_log_kwargs = {}
    if args.with_tracking:
        accelerator_log_kwargs["log_with"] = args.report_to
        accelerator_log_kwargs["project_dir"] = args.output_dir
    # A seedable sampler makes each epoch's data order a function of (seed, epoch): a resumed run sees the same batches.
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                              **accelerator_log_kwargs)
    if not args.no_losparse:
        try:
            utils.check_distributed_support(accelerator)
        except RuntimeError as e:
            raise SystemExit(f"run_summarization.py: error: {e}")
    if args.source_prefix is None and args.model_name_or_path in ["t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b"]:
        logger.warning("You're running a t5 model but didn't provide a source prefix, which is the expected, e.g. "
                       "with `--source_prefix 'summarize: ' `")
    # Make one log on every process with the configuration for debugging.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        logging.getLogger("losparse").setLevel(logging.INFO)
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        logging.getLogger("losparse").setLevel(logging.WARNING)

    # If passed along, set the training seed now.
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process and args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    splitter = resolve_sentence_splitter(args.sentence_splitter)
    fallback = splitter == "regex" and args.sentence_splitter == "auto"
    logger.info(f"ROUGE-Lsum sentence splitter: {splitter}" + (" (nltk punkt data not installed)" if fallback else ""))

    # Get the datasets: a hub dataset (when online) or local csv/json files.
    if args.dataset_name is not None:
        try:
            raw_datasets = load_dataset(args.dataset_name, args.dataset_config_name, revision=args.dataset_revision)
        except RuntimeError as e:
            if "scripts are no longer supported" in str(e):
                raise RuntimeError(f"{e}\n--dataset_name {args.dataset_name} is a script-based dataset on the hub; "
                                   "try --dataset_revision refs/convert/parquet, or local --train_file/"
                                   "--validation_file") from e
            raise
    else:
        data_files = {}
        if args.train_file is not None:
            data_files["train"] = args.train_file
        if args.validation_file is not None:
            data_files["validation"] = args.validation_file
        if args.test_file is not None:
            data_files["test"] = args.test_file
        extension = next(iter(data_files.values())).rsplit(".", 1)[-1]
        extension = "json" if extension == "jsonl" else extension
        raw_datasets = load_dataset(extension, data_files=data_files)

    # Load pretrained model and tokenizer
    if args.config_name:
        config = AutoConfig.from_pretrained(args.config_name)
    elif args.model_name_or_path:
        config = AutoConfig.from_pretrained(args.model_name_or_path)
    else:
        config = CONFIG_MAPPING[args.model_type]()
        logger.warning("You are instantiating a new config instance from scratch.")

    if args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, use_fast=not args.use_slow_tokenizer)
    elif args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, use_fast=not args.use_slow_tokenizer)
    else:
        raise ValueError("You are instantiating a new tokenizer from scratch. This is not supported by this script. "
                         "You can do it from another script, save it, and load it from here, using --tokenizer_name.")

    if args.model_name_or_path:
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model_name_or_path, config=config)
    else:
        logger.info("Training new model from scratch")
        model = AutoModelForSeq2SeqLM.from_config(config)

    # We resize the embeddings only when necessary to avoid index errors.
    embedding_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_size:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.decoder_start_token_id is None:
        raise ValueError("Make sure that `config.decoder_start_token_id` is correctly defined")

    # ===== STEP 1: Replace Matrices =====
    # Substitute each selected weight W by L @ R (truncated SVD) + S (the residual, pruned during training).
    # With --eval_checkpoint the SVD is skipped: the layers are rebuilt at the checkpoint's ranks and loaded.
    if not args.no_losparse:
        utils.substitute_layer_weights(module=model, allow_name=ALLOW_NAME, block_name=BLOCK_NAME,
                                       parameter_ratio=args.low_rank_parameter_ratio,
                                       do_svd=args.eval_checkpoint is None, svd=args.svd)
    if args.eval_checkpoint is not None:
        utils.load_checkpoint(model, args.eval_checkpoint)
        logger.info(f"Loaded --eval_checkpoint {args.eval_checkpoint}")

    prefix = args.source_prefix if args.source_prefix is not None else ""

    # Preprocessing the datasets. First we tokenize all the texts.
    first_split = "train" if "train" in raw_datasets else "validation"
    column_names = raw_datasets[first_split].column_names
    dataset_columns = summarization_name_mapping.get(args.dataset_name, None)
    if args.text_column is None:
        text_column = dataset_columns[0] if dataset_columns is not None else column_names[0]
    else:
        text_column = args.text_column
    if text_column not in column_names:
        raise ValueError(f"--text_column '{text_column}' needs to be one of: {', '.join(column_names)}")
    if args.summary_column is None:
        summary_column = dataset_columns[1] if dataset_columns is not None else column_names[1]
    else:
        summary_column = args.summary_column
    if summary_column not in column_names:
        raise ValueError(f"--summary_column '{summary_column}' needs to be one of: {', '.join(column_names)}")

    if args.val_max_target_length is None:
        args.val_max_target_length = args.max_target_length
    padding = "max_length" if args.pad_to_max_length else False

    def _tokenize(split, max_target_length, max_samples):
        ds = raw_datasets[split]
        if max_samples is not None:
            ds = ds.select(range(min(max_samples, len(ds))))
        fn_kwargs = dict(tokenizer=tokenizer, text_column=text_column, summary_column=summary_column, prefix=prefix,
                         max_source_length=args.max_source_length, max_target_length=max_target_length,
                         padding=padding, ignore_pad_token_for_loss=args.ignore_pad_token_for_loss)
        return ds.map(preprocess_function, batched=True, num_proc=args.preprocessing_num_workers,
                      remove_columns=ds.column_names, load_from_cache_file=not args.overwrite_cache,
                      fn_kwargs=fn_kwargs, desc=f"Running tokenizer on {split}")

    will_train = (args.max_train_steps if args.max_train_steps is not None else args.num_train_epochs) > 0
    if will_train and "train" not in raw_datasets:
        raise ValueError(f"the dataset has no train split (splits: {list(raw_datasets)})")
    if "validation" not in raw_datasets:
        raise ValueError(f"the dataset has no validation split (splits: {list(raw_datasets)})")
    if args.do_predict and "test" not in raw_datasets:
        raise ValueError(f"--do_predict: the dataset has no test split (splits: {list(raw_datasets)})")
    with accelerator.main_process_first():
        train_dataset = _tokenize("train", args.max_target_length, args.max_train_samples) if will_train else None
        eval_dataset = _tokenize("validation", args.val_max_target_length, args.max_eval_samples)
        test_dataset = _tokenize("test", args.val_max_target_length, args.max_eval_samples) if args.do_predict else None

    # Log a few random samples from the training set:
    if train_dataset is not None and len(train_dataset):
        for index in random.sample(range(len(train_dataset)), 1):
            logger.info(f"Sample {index} of the training set: {train_dataset[index]}.")

    label_pad_token_id = -100 if args.ignore_pad_token_for_loss else tokenizer.pad_token_id
    data_collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=label_pad_token_id,
                                           pad_to_multiple_of=8 if accelerator.mixed_precision == "fp16" else None)

    train_dataloader = None
    if train_dataset is not None:
        # Its own generator: creating a data iterator must not draw from the global RNG (dropout), so that a run
        # resumed from a step_<n> checkpoint continues bit for bit.
        data_generator = torch.Generator().manual_seed(args.seed if args.seed is not None else torch.initial_seed())
        train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=data_collator,
                                      batch_size=args.per_device_train_batch_size, generator=data_generator)
    # Evaluation must not draw from the global RNG either (a torch DataLoader without a generator takes a seed from
    # it for every iterator), or a run resumed from a checkpoint written before an evaluation would diverge.
    eval_dataloader = DataLoader(eval_dataset, collate_fn=data_collator, batch_size=args.per_device_eval_batch_size,
                                 generator=torch.Generator().manual_seed(0))
    test_dataloader = None
    if test_dataset is not None:
        test_dataloader = DataLoader(test_dataset, collate_fn=data_collator, batch_size=args.per_device_eval_batch_size,
                                     generator=torch.Generator().manual_seed(0))

    fsdp2 = args.fsdp2 or getattr(accelerator, "is_fsdp2", False)  # bigger than one GPU: ranks hold whole rows
    if fsdp2:
        model = utils.apply_fsdp2(model, accelerator)
    # Optimizer. Split weights in two groups, one with weight decay and the other not.
    no_decay = ["bias", "LayerNorm.weight", "layer_norm.weight"]
    optimizer_grouped_parameters = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(optimizer_grouped_parameters, lr=args.learning_rate)

    # Scheduler and math around the number of training steps.
    overrode_max_train_steps = False
    num_batches_per_epoch = len(train_dataloader) if train_dataloader is not None else 0
    num_update_steps_per_epoch = max(1, math.ceil(num_batches_per_epoch / args.gradient_accumulation_steps))
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch if will_train else 0
        overrode_max_train_steps = True

    lr_scheduler = get_scheduler(name=args.lr_scheduler_type, optimizer=optimizer,
                                 num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max(1, args.max_train_steps) * accelerator.num_processes)

    # Prepare everything with our `accelerator`.
    model, optimizer, eval_dataloader, lr_scheduler = accelerator.prepare(model, optimizer, eval_dataloader,
                                                                          lr_scheduler)
    if fsdp2:  # FSDP2: save_state writes full, 1-process files
        utils.fsdp2_checkpointing(accelerator, model, optimizer)
    if train_dataloader is not None:
        train_dataloader = accelerator.prepare(train_dataloader)
    if test_dataloader is not None:
        test_dataloader = accelerator.prepare(test_dataloader)

    # We need to recalculate our total training steps as the size of the training dataloader may have changed.
    num_batches_per_epoch = len(train_dataloader) if train_dataloader is not None else 0
    num_update_steps_per_epoch = max(1, math.ceil(num_batches_per_epoch / args.gradient_accumulation_steps))
    if overrode_max_train_steps and will_train:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    # Afterwards we recalculate our number of training epochs
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    if args.max_train_steps > 0 and not args.no_losparse:
        # The warm-ups (--initial_warmup + --final_warmup) x --warmup_steps must fit in the run.
        try:
            utils.validate_losparse_args(args, total_step=args.max_train_steps)
        except ValueError as e:
            sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")

    # Figure out how many steps we should save the Accelerator states
    checkpointing_steps = args.checkpointing_steps
    if checkpointing_steps is not None and checkpointing_steps.isdigit():
        checkpointing_steps = int(checkpointing_steps)

    # We need to initialize the trackers we use, and also store our configuration.
    if args.with_tracking:
        experiment_config = {k: (v.value if isinstance(v, SchedulerType) else v) for k, v in vars(args).items()}
        experiment_config = {k: v for k, v in experiment_config.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("summarization_no_trainer", experiment_config)

    # ===== STEP 2: Setup Pruner =====
    # Registered for checkpointing so that --checkpointing_steps / --resume_from_checkpoint carry its statistics.
    pruner = None
    if not args.no_losparse and args.max_train_steps > 0:
        pruner = utils.Pruner(model=model, args=args, total_step=args.max_train_steps, mask_param_name=["sparse"],
                              pruner_name=args.pruner_name, structured_method=args.structured_method,
                              structured_direction=args.structured_direction)
        accelerator.register_for_checkpointing(pruner)

    # Train!
    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset) if train_dataset is not None else 0}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    # Only show the progress bar once on each machine.
    progress_bar = tqdm(range(args.max_train_steps), disable=not accelerator.is_local_main_process)
    completed_steps = 0
    starting_epoch = 0
    resume_step = None
    # Potentially load in the weights and states from a previous save
    checkpoint_path = args.resume_from_checkpoint
    if checkpoint_path == "latest":  # e.g. a job that is resubmitted until it finishes
        checkpoint_path = _latest_checkpoint(args.output_dir)
        if checkpoint_path is None:
            logger.info(f"--resume_from_checkpoint latest: no step_<n> / epoch_<i> folder in {args.output_dir} yet, "
                        "starting from scratch")
    if checkpoint_path:
        accelerator.print(f"Resumed from checkpoint: {checkpoint_path}")
        accelerator.load_state(checkpoint_path)
        # Extract `epoch_{i}` or `step_{i}`
        kind, number = CHECKPOINT_DIR.match(os.path.basename(os.path.normpath(checkpoint_path))).groups()
        if kind == "epoch":
            starting_epoch = int(number) + 1
            completed_steps = starting_epoch * num_update_steps_per_epoch
        else:
            # need to multiply `gradient_accumulation_steps` to reflect real steps
            completed_steps = int(number)
            resume_step = completed_steps * args.gradient_accumulation_steps
            starting_epoch = resume_step // max(1, num_batches_per_epoch)
            resume_step -= starting_epoch * num_batches_per_epoch
    # update the progress_bar if load from checkpoint
    progress_bar.update(min(completed_steps, args.max_train_steps))

    threshold = None  # kept fraction of S (the cubic schedule) at the last optimizer step
    if pruner is not None:
        threshold = args.initial_threshold
        if completed_steps:
            threshold = pruner.schedule_threshold_comb(completed_steps - 1)[0]
    result, predictions, eval_time, train_start = None, None, 0.0, time.perf_counter()
    for epoch in range(starting_epoch, args.num_train_epochs):
        model.train()
        total_loss, num_batches = 0.0, 0
        train_dataloader.set_epoch(epoch)
        if epoch == starting_epoch and resume_step is not None:
            # We skip the first `n` batches in the dataloader when resuming from a checkpoint
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_step)
            active_dataloader.set_epoch(epoch)
        else:
            active_dataloader = train_dataloader
        for step, batch in enumerate(active_dataloader):
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                # We keep track of the loss at each epoch
                total_loss += loss.detach().float()
                num_batches += 1
                accelerator.backward(loss)
                optimizer.step()

                # ===== STEP 3: Prune During Training =====
                # After optimizer.step(), before zero_grad(), once per optimizer step (when gradients are synced).
                if pruner is not None and accelerator.sync_gradients:
                    threshold, mask_threshold = pruner.update_and_pruning(model, completed_steps)

                lr_scheduler.step()
                optimizer.zero_grad()

            # Checks if the accelerator has performed an optimization step behind the scenes
            if accelerator.sync_gradients:
                progress_bar.update(1)
                completed_steps += 1
                if isinstance(checkpointing_steps, int) and completed_steps % checkpointing_steps == 0:
                    output_dir = f"step_{completed_steps}"
                    if args.output_dir is not None:
                        output_dir = os.path.join(args.output_dir, output_dir)
                    utils.save_state_atomic(accelerator, output_dir)

            if completed_steps >= args.max_train_steps:
                break

        eval_start = time.perf_counter()
        result, predictions = generate_and_score(model, eval_dataloader, accelerator, tokenizer, args)
        eval_time += time.perf_counter() - eval_start
        report = utils.compression_report(model)
        train_loss = (total_loss / max(1, num_batches)).item() if num_batches else float("nan")
        logger.info(f"epoch {epoch} step {completed_steps}: {_fmt(result)}, train_loss {train_loss:.4f}, "
                    f"threshold {threshold}, effective_ratio {report.effective_ratio:.4f}")

        if args.with_tracking:
            log = {f"eval_{k}": v for k, v in result.items()}
            log.update(train_loss=train_loss, epoch=epoch, step=completed_steps,
                       effective_ratio=report.effective_ratio)
            if threshold is not None:
                log["threshold"] = threshold
            accelerator.log(log, step=completed_steps)

        if args.checkpointing_steps == "epoch":
            output_dir = f"epoch_{epoch}"
            if args.output_dir is not None:
                output_dir = os.path.join(args.output_dir, output_dir)
            utils.save_state_atomic(accelerator, output_dir)
    train_runtime = time.perf_counter() - train_start - eval_time

    if result is None:  # no training epoch ran (e.g. --eval_checkpoint with --num_train_epochs 0)
        result, predictions = generate_and_score(model, eval_dataloader, accelerator, tokenizer, args)
        logger.info(f"eval: {_fmt(result)}")

    test_result, test_predictions = None, None
    if test_dataloader is not None:
        test_result, test_predictions = generate_and_score(model, test_dataloader, accelerator, tokenizer, args)
        logger.info(f"test: {_fmt(test_result)}")

    report = utils.compression_report(model)
    logger.info("LoSparse compression report:\n" + report.table())

    if args.with_tracking:
        accelerator.end_training()

    if args.output_dir is not None:
        accelerator.wait_for_everyone()
        unwrapped_model = accelerator.unwrap_model(model)
        if fsdp2:  # FSDP2: gather the full weights
            unwrapped_model = utils.fsdp2_full_model(unwrapped_model)
        unwrapped_model.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(args.output_dir)
            # The LoSparse checkpoint in the original key layout (what --eval_checkpoint loads).
            utils.save_checkpoint(unwrapped_model, os.path.join(args.output_dir, "pytorch_model.bin"))
            if not args.no_losparse:  # only L, R and the kept rows of S (utils.load_compact)
                utils.export_compact(unwrapped_model, os.path.join(args.output_dir, "compact"), tokenizer=tokenizer,
                                     losparse_args=args)
            with open(os.path.join(args.output_dir, "generated_predictions.txt"), "w", encoding="utf-8") as f:
                f.writelines(p.replace("\n", " ") + "\n" for p in predictions)
            all_results = {f"eval_{k}": v for k, v in result.items()}
            if test_result is not None:
                all_results.update({f"test_{k}": v for k, v in test_result.items()})
                with open(os.path.join(args.output_dir, "test_generated_predictions.txt"), "w", encoding="utf-8") as f:
                    f.writelines(p.replace("\n", " ") + "\n" for p in test_predictions)
            all_results.update(
                eval_samples=len(predictions), effective_ratio=report.effective_ratio, model_params=report.model_params,
                model_params_dense_equivalent=report.model_params_dense_equivalent,
                train_runtime_s=train_runtime, train_steps=completed_steps, threshold=threshold,
                rougeLsum_sentence_splitter=splitter)
            with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
                json.dump(all_results, f, indent=2)


if __name__ == "__main__":
    with utils.one_line_errors("run_summarization.py"):
        main()
