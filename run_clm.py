#!/usr/bin/env python
# coding=utf-8
"""Fine-tune and compress a decoder LLM (causal language modeling) with LoSparse; report perplexity.

The shape of Hugging Face's ``examples/pytorch/language-modeling/run_clm_no_trainer.py`` (Accelerate, argparse,
tqdm, trackers, checkpointing, texts grouped in blocks of ``--block_size``) with the three LoSparse hooks marked
``STEP 1/2/3``, as in run_glue.py. The STEP 1 lists come from the model family (``config.model_type``: LLaMA,
Mistral, Qwen2, Qwen3, Gemma, OPT, GPT-NeoX/Pythia); ``lm_head`` and the embeddings are never replaced.

    # compress Qwen2.5-0.5B on WikiText-2 (low-rank 0.2 + 30 % of the rows of S), perplexity on the test split
    python run_clm.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name wikitext \\
        --dataset_config_name wikitext-2-raw-v1 --eval_split test --block_size 2048 \\
        --low_rank_parameter_ratio 0.2 --final_threshold 0.3 --warmup_steps 50 --output_dir out
    # a GGUF checkpoint is de-quantized when loaded
    python run_clm.py --model_name_or_path DIR --gguf_file model.Q4_1.gguf --train_file a.txt ...
    # perplexity of a saved LoSparse checkpoint
    python run_clm.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name wikitext \\
        --dataset_config_name wikitext-2-raw-v1 --eval_split test --block_size 2048 \\
        --eval_checkpoint out/pytorch_model.bin --num_train_epochs 0 --output_dir eval_out
"""
import argparse
import json
import logging
import math
import os
import random
import re
import time
from itertools import chain

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from datasets import load_dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    SchedulerType,
    default_data_collator,
    get_scheduler,
)

import utils

logger = get_logger(__name__)

DATA_EXTENSIONS = ("txt", "csv", "json", "jsonl")
CHECKPOINT_DIR = re.compile(r"^(step|epoch)_(\d+)$")
TORCH_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# STEP 1 allow / block lists per model family (``config.model_type``). The walker replaces an nn.Linear child
# whose attribute name is a substring of an allow entry, and does not enter a child whose name is a substring of
# a block entry. lm_head and the embeddings are never replaced (they are often tied).
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILY_ALLOW_NAME = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
BLOCK_NAME = ["lm_head", "embed_tokens", "embed_positions", "embed_in", "embed_out", "project_in", "project_out",
              "norm"]
# Families whose projections are transformers' Conv1D (weight stored in x out), which the walker refuses.
CONV1D_FAMILIES = ("gpt2", "gpt_bigcode", "imagegpt")


def _blocks_per_pass(value):
    """``--calibration_blocks_per_pass``: ``auto`` or an integer."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 or auto, got {value!r}") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Finetune and compress (LoSparse) a transformers model on a causal "
                                                 "language modeling task")
    parser.add_argument("--dataset_name", type=str, default=None,
                        help="The name of the dataset to use (via the datasets library), e.g. wikitext.")
    parser.add_argument("--dataset_config_name", type=str, default=None,
                        help="The configuration name of the dataset to use, e.g. wikitext-2-raw-v1.")
    parser.add_argument("--train_file", type=str, default=None,
                        help="A txt, csv, json or jsonl file containing the training data.")
    parser.add_argument("--validation_file", type=str, default=None,
                        help="A txt, csv, json or jsonl file containing the validation data.")
    parser.add_argument("--validation_split_percentage", type=int, default=5,
                        help="The percentage of the train set used as validation set when there is no validation "
                             "split.")
    parser.add_argument("--eval_split", type=str, default="validation", choices=["validation", "test"],
                        help="The split the perplexity is computed on (with --dataset_name; 'test' for the WikiText-2 "
                             "figures of the literature). Local files are evaluated on --validation_file.")
    parser.add_argument("--text_column", type=str, default=None,
                        help="The column holding the text in csv/json files (default: 'text' if present, else the "
                             "first string column).")
    parser.add_argument("--no_keep_linebreaks", action="store_true",
                        help="Do not keep line breaks when using txt files.")
    parser.add_argument("--text_suffix", type=str, default=None,
                        help="A string appended to every text before tokenization, e.g. a line break or the EOS "
                             "token when each csv/json row is a separate document (texts are concatenated into "
                             "blocks; txt lines keep their own line breaks). Python escapes (\\n) are decoded.")
    parser.add_argument("--block_size", type=int, default=None,
                        help="Training and evaluation blocks: the tokenized texts are concatenated and cut into "
                             "blocks of this many tokens (default: min(1024, the model's context)).")
    parser.add_argument("--max_train_samples", type=int, default=None,
                        help="Keep only the first this many training blocks (quick runs).")
    parser.add_argument("--max_eval_samples", type=int, default=None,
                        help="Keep only the first this many evaluation blocks (quick runs).")
    parser.add_argument("--preprocessing_num_workers", type=int, default=None,
                        help="The number of processes to use for the preprocessing.")
    parser.add_argument("--overwrite_cache", action="store_true", help="Overwrite the cached training and evaluation sets")
    parser.add_argument("--model_name_or_path", type=str, required=True,
                        help="Path to pretrained model or model identifier from huggingface.co/models.")
    parser.add_argument("--gguf_file", type=str, default=None,
                        help="A GGUF file inside --model_name_or_path (a directory or Hub repository); its weights "
                             "are de-quantized when loaded (needs the `gguf` package).")
    parser.add_argument("--tokenizer_name", type=str, default=None,
                        help="Pretrained tokenizer name or path if not the same as model_name_or_path.")
    parser.add_argument("--use_slow_tokenizer", action="store_true",
                        help="If passed, will use a slow tokenizer (not backed by the 🤗 Tokenizers library).")
    parser.add_argument("--torch_dtype", type=str, default="float32", choices=list(TORCH_DTYPES),
                        help="dtype the weights are loaded (and trained) in. float32 (default) keeps full-precision "
                             "weights, use --mixed_precision bf16 for bf16 compute; bfloat16 halves the memory of "
                             "weights, gradients and optimizer state (pure bf16 training); auto = the checkpoint's.")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="Recompute the activations in the backward pass: less memory, about 30 %% more time.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow custom models defined on the Hub in their own modeling files.")
    parser.add_argument("--allow_name", type=str, nargs="+", default=None,
                        help="Override the STEP 1 allow list of the model family (names of the nn.Linear attributes "
                             "to compress); needed for a family not in the README table.")
    parser.add_argument("--block_name", type=str, nargs="+", default=None,
                        help="Override the STEP 1 block list (names of the submodules not to enter).")
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
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Overrides `accelerate launch --mixed_precision` / the accelerate config.")
    parser.add_argument("--push_to_hub", action="store_true", help="Whether or not to push the model to the Hub.")
    parser.add_argument("--hub_model_id", type=str,
                        help="The name of the repository to keep in sync with the local `output_dir`.")
    parser.add_argument("--hub_token", type=str, help="The token to use to push to the Model Hub.")
    parser.add_argument("--checkpointing_steps", type=str, default=None,
                        help="Whether the various states should be saved at the end of every n steps, or 'epoch' for "
                             "each epoch.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help="If the training should continue from a checkpoint folder (a step_N / epoch_N folder, "
                             "or 'latest' for the newest one in --output_dir).")
    parser.add_argument("--eval_steps", type=int, default=None,
                        help="Also evaluate every this many optimizer steps (default: at the end of each epoch only).")
    parser.add_argument("--with_tracking", action="store_true", help="Whether to enable experiment trackers for logging.")
    parser.add_argument("--report_to", type=str, default="all",
                        help='The integration to report the results and logs to. Supported platforms are '
                             '`"tensorboard"`, `"wandb"`, `"comet_ml"` and `"clearml"`. Use `"all"` (default) to '
                             "report to all integrations. Only applicable when `--with_tracking` is passed.")
    g = parser.add_argument_group("LoSparse for LLMs: calibration and one-shot rows")
    g.add_argument("--init", type=str, default="svd", choices=["svd", "calibrated"],
                   help="STEP 1 fit of L, R: svd (the original: truncated SVD of W) or calibrated (activation-aware: "
                        "minimise E||(W - LR)x||^2 over --calibration_samples blocks of text, the whitened SVD of "
                        "SVD-LLM).")
    g.add_argument("--calibration_samples", type=int, default=32,
                   help="Blocks of --block_size tokens run through the model once for --init calibrated / --one_shot "
                        "(the first blocks of --calibration_file, else of the training data).")
    g.add_argument("--calibration_file", type=str, default=None,
                   help="A txt, csv, json or jsonl file with the calibration text (default: the training file/split; "
                        "the same --text_column).")
    g.add_argument("--calibration_blocks_per_pass", type=_blocks_per_pass, default="auto",
                   help="Streaming calibration for large models (--init calibrated): measure and decompose this many "
                        "decoder blocks per pass over the calibration blocks instead of every layer at once "
                        "(utils.InputCovariances; same result, peak memory of one group's statistics). 0: one pass; "
                        "auto (default): one pass when the statistics of every layer take at most half of the memory "
                        "free on the device after loading the model, else as many blocks per pass as fit in it "
                        "(utils.blocks_per_pass; at least 1).")
    g.add_argument("--one_shot", action="store_true",
                   help="Compress with no training and report that perplexity before any training. With --init "
                        "calibrated: one budget of (--low_rank_parameter_ratio + --final_threshold) of the replaced "
                        "matrices, shared out over every layer's rank and kept rows of S by the second-order loss "
                        "increase on the calibration blocks (input statistics and output Fisher, "
                        "utils.one_shot_allocate); PLATON then goes on at the fraction of S kept. With --init svd: "
                        "keep the --final_threshold of the rows of S with the most output energy (utils.one_shot_rows)."
                        " Pass --num_train_epochs 0 to only compress and save.")
    g.add_argument("--sequential", type=float, default=None, metavar="A",
                   help="With --init calibrated --one_shot: after the allocation, refit every layer, block by block, "
                        "to the original layer's outputs given the inputs the already compressed blocks produce (the "
                        "sequential update of SVD-LLM, rows of S included; same ranks and rows). A in (0, 1] is the "
                        "weight kept on the fit to the original inputs (1: no change; 0.8 is a safe start: lower "
                        "values overfit a few calibration blocks; it gains more with more of them, e.g. "
                        "--calibration_samples 256). Default: off.")
    utils.add_losparse_args(parser)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _trains(args):
    """Whether the run trains (``--num_train_epochs 0`` or ``--max_train_steps 0`` only evaluate)."""
    if args.max_train_steps is not None:
        return args.max_train_steps > 0
    return args.num_train_epochs > 0


def _extension(path):
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


def _check_args(parser, args):
    """Every check that needs no model or data, so a bad flag stops the run before anything is loaded."""
    try:
        utils.validate_losparse_args(args)
    except ValueError as e:
        parser.error(str(e))
    local = args.train_file is not None or args.validation_file is not None
    if args.dataset_name is None and not local:
        parser.error("need either --dataset_name or --train_file/--validation_file")
    if args.dataset_name is not None and local:
        parser.error("pass either --dataset_name or --train_file/--validation_file, not both")
    if local:
        if _trains(args) and args.train_file is None:
            parser.error("--train_file is required to train on local files (or pass --num_train_epochs 0 to only "
                         "evaluate --validation_file)")
        if args.train_file is None and args.validation_file is None:
            parser.error("need --train_file or --validation_file")
        if args.eval_split != "validation":
            parser.error("--eval_split test needs --dataset_name; local files are evaluated on --validation_file")
    extensions = set()
    for flag in ("train_file", "validation_file"):
        path = getattr(args, flag)
        if path is None:
            continue
        ext = _extension(path)
        if ext not in DATA_EXTENSIONS:
            parser.error(f"--{flag} should be a {'/'.join(DATA_EXTENSIONS)} file, got {path}")
        if not os.path.isfile(path):
            parser.error(f"--{flag} {path} does not exist")
        extensions.add("json" if ext == "jsonl" else ext)
    if len(extensions) > 1:
        parser.error("--train_file and --validation_file must have the same format")
    if not 0 < args.validation_split_percentage < 100:
        parser.error(f"--validation_split_percentage must be in (0, 100), got {args.validation_split_percentage}")
    if args.gguf_file is not None:
        if os.path.isdir(args.model_name_or_path):
            path = os.path.join(args.model_name_or_path, args.gguf_file)
            if not os.path.isfile(path):
                found = sorted(f for f in os.listdir(args.model_name_or_path) if f.endswith(".gguf"))
                parser.error(f"--gguf_file {args.gguf_file}: no such file in --model_name_or_path "
                             f"{args.model_name_or_path} (GGUF files there: {found or 'none'})")
        elif os.path.exists(args.model_name_or_path):
            parser.error(f"--gguf_file needs --model_name_or_path to be a directory or a Hub repository, got the file "
                         f"{args.model_name_or_path}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("block_size", "max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.block_size is not None and args.block_size < 2:
        parser.error(f"--block_size must be >= 2 (a block predicts its tokens 2..n), got {args.block_size}")
    for name in ("num_train_epochs", "num_warmup_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps < 0:
        parser.error(f"--max_train_steps must be >= 0, got {args.max_train_steps}")
    if not args.learning_rate > 0:
        parser.error(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.eval_steps is not None and args.eval_steps < 1:
        parser.error(f"--eval_steps must be >= 1, got {args.eval_steps}")
    cs = args.checkpointing_steps
    if cs is not None and cs != "epoch" and not (cs.isdigit() and int(cs) > 0):
        parser.error(f"--checkpointing_steps must be a positive integer or 'epoch', got {cs!r}")
    if args.resume_from_checkpoint is not None:
        if args.resume_from_checkpoint == "latest":
            if args.output_dir is None:
                parser.error("--resume_from_checkpoint latest needs --output_dir")
        elif not os.path.isdir(args.resume_from_checkpoint):
            parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a directory")
        if not _trains(args):
            parser.error("--resume_from_checkpoint needs a training run (not --num_train_epochs 0)")
    if args.eval_checkpoint is not None:
        if not os.path.exists(args.eval_checkpoint):
            parser.error(f"--eval_checkpoint {args.eval_checkpoint} does not exist")
        if _trains(args):
            parser.error("--eval_checkpoint evaluates a saved checkpoint without training: pass --num_train_epochs 0")
        if args.no_losparse:
            parser.error("--eval_checkpoint loads a LoSparse checkpoint: it cannot be combined with --no_losparse")
    if args.push_to_hub and args.output_dir is None:
        parser.error("--push_to_hub needs --output_dir")
    calibrates = args.init == "calibrated" or args.one_shot
    if calibrates:
        if args.no_losparse or args.eval_checkpoint is not None:
            parser.error("--init calibrated / --one_shot compress the model in STEP 1: they cannot be combined with "
                         f"{'--no_losparse' if args.no_losparse else '--eval_checkpoint'}")
        if args.calibration_samples < 1:
            parser.error(f"--calibration_samples must be >= 1, got {args.calibration_samples}")
        if args.calibration_file is not None:
            ext = _extension(args.calibration_file)
            if ext not in DATA_EXTENSIONS:
                parser.error(f"--calibration_file should be a {'/'.join(DATA_EXTENSIONS)} file, got "
                             f"{args.calibration_file}")
            if not os.path.isfile(args.calibration_file):
                parser.error(f"--calibration_file {args.calibration_file} does not exist")
        elif args.train_file is None and args.dataset_name is None:
            parser.error("--init calibrated / --one_shot need calibration text: pass --calibration_file or "
                         "--train_file")
        if args.one_shot and args.structured_direction != "row":
            parser.error(f"--one_shot keeps whole rows of S: --structured_direction {args.structured_direction} "
                         "cannot go on from them (use --structured_direction row)")
        if args.one_shot and args.structured_method == "none":
            parser.error("--one_shot keeps whole rows of S: --structured_method none (unstructured) cannot go on from "
                         "them (use --structured_method mean, sum, max or min)")
        if args.init == "calibrated" and args.one_shot and args.svd == "randomized":
            parser.error("--svd randomized has no effect with --init calibrated --one_shot: the allocation needs "
                         "every singular value of each whitened matrix (full SVDs; --svd auto picks them); use "
                         "--svd full or auto")
    elif args.calibration_file is not None:
        parser.error("--calibration_file is used by --init calibrated or --one_shot only")
    if args.sequential is not None:
        if not (args.init == "calibrated" and args.one_shot):
            parser.error("--sequential refits the one-shot allocation: pass it with --init calibrated --one_shot")
        if not 0 < args.sequential <= 1:
            parser.error(f"--sequential must be in (0, 1], got {args.sequential}")
    if args.calibration_blocks_per_pass != "auto" and args.calibration_blocks_per_pass < 0:
        parser.error(f"--calibration_blocks_per_pass must be >= 0 or auto, got {args.calibration_blocks_per_pass}")
    if args.calibration_blocks_per_pass not in ("auto", 0) and args.init != "calibrated":
        parser.error("--calibration_blocks_per_pass streams the statistics of --init calibrated; with --init svd "
                     "--one_shot every layer's statistics are needed at once (pass --init calibrated)")


def losparse_lists(config, allow_name=None, block_name=None):
    """The STEP 1 ``(allow_name, block_name)`` of a model family; raise ValueError for one we cannot compress."""
    model_type = getattr(config, "model_type", None)
    if model_type in CONV1D_FAMILIES and allow_name is None:
        raise ValueError(f"model_type {model_type!r} stores its projections in transformers' Conv1D (weight in x out), "
                         "which LoSparse does not replace; use a family with nn.Linear projections (see the README "
                         "table) or --no_losparse")
    if allow_name is None:
        if model_type not in FAMILY_ALLOW_NAME:
            raise ValueError(f"no STEP 1 list for model_type {model_type!r} (known: {sorted(FAMILY_ALLOW_NAME)}): pass "
                             "--allow_name with the names of its nn.Linear projections (and --block_name if needed)")
        allow_name = FAMILY_ALLOW_NAME[model_type]
    return list(allow_name), list(BLOCK_NAME if block_name is None else block_name)


def model_context(config):
    """The longest sequence the model's position encoding supports (None when the config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def token_losses(logits, labels):
    """Per-sequence sum of the next-token cross-entropies, and the number of predicted tokens (label != -100)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="none").view(shift_labels.shape)
    return loss.sum(dim=1), (shift_labels != -100).sum(dim=1)


def perplexity_of(loss_sum, n_tokens):
    """``exp(sum of token losses / number of predicted tokens)`` and that mean loss (inf past float range)."""
    eval_loss = loss_sum / n_tokens
    try:
        return math.exp(eval_loss), eval_loss
    except OverflowError:
        return float("inf"), eval_loss


def load_raw_datasets(args):
    """A DatasetDict with ``train`` (when training or given) and ``validation`` (the split that is evaluated)."""
    if args.dataset_name is not None:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
        out = datasets.DatasetDict()
        if "train" in raw:
            out["train"] = raw["train"]
        if args.eval_split in raw:
            out["validation"] = raw[args.eval_split]
        elif args.eval_split == "validation" and "train" in raw:
            out["validation"] = load_dataset(args.dataset_name, args.dataset_config_name,
                                             split=f"train[:{args.validation_split_percentage}%]")
            out["train"] = load_dataset(args.dataset_name, args.dataset_config_name,
                                        split=f"train[{args.validation_split_percentage}%:]")
        else:
            raise SystemExit(f"run_clm.py: error: --eval_split {args.eval_split}: the dataset {args.dataset_name} has "
                             f"the splits {list(raw.keys())}")
        return out
    data_files = {}
    if args.train_file is not None:
        data_files["train"] = args.train_file
    if args.validation_file is not None:
        data_files["validation"] = args.validation_file
    extension = _extension(args.train_file or args.validation_file)
    dataset_args = {}
    if extension == "txt":
        extension = "text"
        dataset_args["keep_linebreaks"] = not args.no_keep_linebreaks
    elif extension == "jsonl":
        extension = "json"
    raw = load_dataset(extension, data_files=data_files, **dataset_args)
    # If no validation data is there, validation_split_percentage will be used to divide the dataset.
    if "validation" not in raw:
        pct = args.validation_split_percentage
        raw["validation"] = load_dataset(extension, data_files=data_files, split=f"train[:{pct}%]", **dataset_args)
        raw["train"] = load_dataset(extension, data_files=data_files, split=f"train[{pct}%:]", **dataset_args)
    return raw


def text_column_of(dataset, requested):
    """The text column: ``requested`` if given, else ``text``, else the first string column."""
    columns = dataset.column_names
    if requested is not None:
        if requested not in columns:
            raise SystemExit(f"run_clm.py: error: --text_column {requested} is not a column of the data "
                             f"(columns: {columns})")
        return requested
    if "text" in columns:
        return "text"
    strings = [c for c in columns if getattr(dataset.features[c], "dtype", None) in ("string", "large_string")]
    if not strings:
        raise SystemExit(f"run_clm.py: error: the data has no text column (columns: {columns}); pass --text_column")
    return strings[0]


class TrainState:
    """Counters saved with the Accelerate state, so a resumed run knows where it is and keeps the data order."""

    def __init__(self, data_seed):
        self.data_seed = int(data_seed)
        self.completed_steps = 0

    def state_dict(self):
        return {"data_seed": self.data_seed, "completed_steps": self.completed_steps}

    def load_state_dict(self, state_dict):
        self.data_seed = int(state_dict["data_seed"])
        self.completed_steps = int(state_dict["completed_steps"])


def _latest_checkpoint(output_dir):
    """The most recently completed ``step_<n>`` / ``epoch_<i>`` folder in ``output_dir``, or None (incomplete ones,
    from a run stopped while writing them, are skipped with a warning)."""
    return utils.latest_checkpoint(output_dir, CHECKPOINT_DIR.pattern)


def _drop_gguf_quantizer(model):
    """A GGUF checkpoint loads de-quantized into plain nn.Linear layers, but transformers keeps its quantizer, which
    refuses ``save_pretrained``. Drop it (and ``quantization_config``) when no layer stayed packed."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if getattr(quantizer, "packed_modules", None):
        raise SystemExit("run_clm.py: error: --gguf_file: transformers kept some weights packed in GGUF blocks "
                         f"({len(quantizer.packed_modules)} layers); LoSparse needs de-quantized nn.Linear weights")
    quantizer.remove_quantization_config(model)


def main(argv=None):
    args = parse_args(argv)
    # Paths and files first (seconds): a run that cannot read its data or write its results stops before training.
    utils.check_run_paths(args)
    do_train = _trains(args)

    # Initialize the accelerator. We will let the accelerator handle device placement for us in this example.
    accelerator_kwargs = {}
    if args.with_tracking:
        accelerator_kwargs["log_with"] = args.report_to
        accelerator_kwargs["project_dir"] = args.output_dir
    if args.mixed_precision is not None:
        accelerator_kwargs["mixed_precision"] = args.mixed_precision
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, **accelerator_kwargs)

    # Make one log on every process with the configuration for debugging.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        logging.getLogger("losparse").setLevel(logging.WARNING)
    if not args.no_losparse:
        try:
            utils.check_distributed_support(accelerator)
        except RuntimeError as e:
            raise SystemExit(f"run_clm.py: error: {e}")

    # If passed along, set the training seed now.
    if args.seed is not None:
        set_seed(args.seed)
    # The data order of epoch e is a function of (data_seed, e) only, so a resumed run sees the same batches.
    data_seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)

    # Handle the repository creation
    repo_id = None
    if accelerator.is_main_process:
        if args.push_to_hub:
            from huggingface_hub import HfApi

            repo_name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            repo_id = HfApi().create_repo(repo_name, exist_ok=True, token=args.hub_token).repo_id
        if args.output_dir is not None:
            os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    # The config first (a GGUF file's header only): the family's STEP 1 lists and the context length are checked
    # before the data is tokenized or the weights are read.
    load_kwargs = {"trust_remote_code": args.trust_remote_code}
    if args.gguf_file is not None:
        load_kwargs["gguf_file"] = args.gguf_file
    config = AutoConfig.from_pretrained(args.model_name_or_path, **load_kwargs)
    allow_name = block_name = None
    if not args.no_losparse:
        try:
            allow_name, block_name = losparse_lists(config, args.allow_name, args.block_name)
        except ValueError as e:
            raise SystemExit(f"run_clm.py: error: {e}")
    context = model_context(config)
    if args.block_size is not None and context is not None and args.block_size > context:
        raise SystemExit(f"run_clm.py: error: --block_size {args.block_size} is larger than the model's context "
                         f"({context} positions, config.max_position_embeddings)")

    tokenizer_kwargs = {"use_fast": False} if args.use_slow_tokenizer else {}
    if args.tokenizer_name is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, trust_remote_code=args.trust_remote_code,
                                                  **tokenizer_kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, **load_kwargs, **tokenizer_kwargs)

    # Get the datasets: a dataset from the Hub (e.g. wikitext / wikitext-2-raw-v1), or local txt/csv/json files.
    raw_datasets = load_raw_datasets(args)
    calibrates = not args.no_losparse and (args.init == "calibrated" or args.one_shot)
    if args.calibration_file is not None:
        ext = _extension(args.calibration_file)
        ext = {"txt": "text", "jsonl": "json"}.get(ext, ext)
        raw_datasets["calibration"] = load_dataset(
            ext, data_files={"calibration": args.calibration_file},
            **({"keep_linebreaks": not args.no_keep_linebreaks} if ext == "text" else {}))["calibration"]
    if not do_train and "train" in raw_datasets and not (calibrates and args.calibration_file is None):
        del raw_datasets["train"]
    text_column = text_column_of(raw_datasets["validation"], args.text_column)
    for split in raw_datasets:
        if text_column not in raw_datasets[split].column_names:
            raise SystemExit(f"run_clm.py: error: the {split} data has no column {text_column!r} "
                             f"(columns: {raw_datasets[split].column_names}); pass --text_column")

    if args.block_size is None:
        block_size = min(1024, context or 1024)
        if tokenizer.model_max_length and tokenizer.model_max_length < block_size:
            block_size = tokenizer.model_max_length
        logger.info(f"--block_size not given: using {block_size}")
    else:
        block_size = args.block_size

    # Preprocessing the datasets: tokenize every text, concatenate them and cut the result in blocks of block_size
    # (the remainder of each map batch is dropped), as the Hugging Face example does.
    suffix = "" if args.text_suffix is None else args.text_suffix.encode("utf-8").decode("unicode_escape")

    def tokenize_function(examples):
        texts = [(t if isinstance(t, str) else "") + suffix for t in examples[text_column]]
        return tokenizer(texts)

    def group_texts(examples):
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated_examples.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    lm_datasets = {}
    with accelerator.main_process_first():
        for split in raw_datasets:
            tokenized = raw_datasets[split].map(
                tokenize_function, batched=True, num_proc=args.preprocessing_num_workers,
                remove_columns=raw_datasets[split].column_names, load_from_cache_file=not args.overwrite_cache,
                desc=f"Running tokenizer on the {split} split")
            keep = [c for c in tokenized.column_names if c in ("input_ids", "attention_mask")]
            tokenized = tokenized.select_columns(keep)
            lm_datasets[split] = tokenized.map(
                group_texts, batched=True, num_proc=args.preprocessing_num_workers,
                load_from_cache_file=not args.overwrite_cache, desc=f"Grouping texts in chunks of {block_size}")
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if split in lm_datasets and limit is not None and limit < len(lm_datasets[split]):
            lm_datasets[split] = lm_datasets[split].select(range(limit))
    for split in lm_datasets:
        if len(lm_datasets[split]) == 0:
            if split == "validation" and args.validation_file is not None:
                source = f"--validation_file {args.validation_file}"
            elif split == "train" and args.train_file is not None:
                source = f"--train_file {args.train_file}"
            elif split == "calibration":
                source = f"--calibration_file {args.calibration_file}"
            elif args.train_file is not None:
                source = (f"the validation part ({args.validation_split_percentage} %) of --train_file "
                          f"{args.train_file}")
            else:
                source = f"the {split} data"
            raise SystemExit(f"run_clm.py: error: {source} has fewer tokens than one block of --block_size "
                             f"{block_size}")
    train_dataset = lm_datasets.get("train") if do_train else None
    eval_dataset = lm_datasets["validation"]
    calibration_dataset = None
    if calibrates:
        calibration_dataset = lm_datasets.get("calibration", lm_datasets.get("train"))
        if calibration_dataset is None:
            raise SystemExit("run_clm.py: error: --init calibrated / --one_shot: no calibration text (pass "
                             "--calibration_file)")
        calibration_dataset = calibration_dataset.select(range(min(args.calibration_samples, len(calibration_dataset))))
    # A resumed run takes every layer's rank and kept rows (a one-shot allocation gives each layer its own) and every
    # weight from its checkpoint: STEP 1 then runs no calibration and no SVD.
    checkpoint_path = None
    if do_train and args.resume_from_checkpoint is not None:
        checkpoint_path = args.resume_from_checkpoint
        if checkpoint_path == "latest":  # e.g. a job that is resubmitted until it finishes
            checkpoint_path = _latest_checkpoint(args.output_dir)
            if checkpoint_path is None:
                logger.info(f"--resume_from_checkpoint latest: no step_N / epoch_N folder in {args.output_dir} yet, "
                            "starting from scratch")

    # Load pretrained model
    dtype = TORCH_DTYPES[args.torch_dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, config=config, dtype=dtype, **load_kwargs)
    if args.gguf_file is not None:
        _drop_gguf_quantizer(model)
    # We resize the embeddings only when necessary to avoid index errors.
    embedding_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_size:
        model.resize_token_embeddings(len(tokenizer))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    # ===== STEP 1: Replace Matrices =====
    # Substitute weights with low rank matrix and sparse matrix. With --eval_checkpoint the SVD is skipped and each
    # layer takes the rank found in the file.
    # --init calibrated / --one_shot: the input statistics C = E[x x^T] of every layer to replace, from one pass
    # over the calibration blocks, give the activation-aware L R and the one-shot choice of the rows of S.
    allocates = not args.no_losparse and args.init == "calibrated" and args.one_shot
    if not args.no_losparse:
        input_cov = output_fisher = None
        if calibrates and checkpoint_path is None:
            if accelerator.num_processes == 1:
                model.to(accelerator.device)
            ids = torch.tensor(calibration_dataset["input_ids"], device=model.device)
            logger.info(f"Calibration: {len(ids)} blocks of {block_size} tokens")
            step = args.per_device_eval_batch_size
            calib_batches = [ids[i: i + step] for i in range(0, len(ids), step)]
            per_pass = args.calibration_blocks_per_pass
            if per_pass == "auto":  # stream when every layer's statistics would take over half the free memory
                budget = utils.memory_budget(model.device)
                per_pass = 0 if budget is None or args.init != "calibrated" else \
                    utils.blocks_per_pass(model, budget, allow_name, block_name)
                if per_pass:
                    stats = sum(utils.statistics_bytes(model, allow_name, block_name).values())
                    logger.info(f"--calibration_blocks_per_pass auto: {per_pass} decoder blocks per pass (the "
                                f"statistics of every layer, {stats / 2 ** 30:.1f} GiB at most, exceed half of the "
                                f"{2 * budget / 2 ** 30:.1f} GiB free on {model.device})")
            try:
                if per_pass:  # streaming: one group of blocks measured at a time
                    input_cov = utils.InputCovariances(model, calib_batches, allow_name, block_name, per_pass)
                else:
                    input_cov = utils.collect_input_covariance(model, calib_batches, allow_name, block_name)
                if allocates:
                    output_fisher = utils.collect_output_fisher(model, calib_batches, allow_name, block_name)
            except (ValueError, RuntimeError) as e:
                raise SystemExit(f"run_clm.py: error: calibration: {e}")
    if allocates and checkpoint_path is None:
        # --init calibrated --one_shot: one budget, (--low_rank_parameter_ratio + --final_threshold) of the replaced
        # matrices, shared out over ranks and kept rows of S of every layer by the second-order loss increase
        # (two-sided whitened SVD with the output Fisher; utils.one_shot_allocate). PLATON then goes on at the
        # fraction of S the allocation kept, so the budget stays that of the two flags.
        budget = min(1.0, args.low_rank_parameter_ratio + args.final_threshold)
        try:
            info = utils.one_shot_allocate(model, input_cov, output_fisher, budget, allow_name, block_name,
                                           sequential=None if args.sequential is None else calib_batches,
                                           sequential_damp=args.sequential or 1.0)
        except (ValueError, RuntimeError) as e:
            raise SystemExit(f"run_clm.py: error: --one_shot: {e}")
        del input_cov, output_fisher
        kept_s = sum(x["kept_rows"] * x["in_features"] for x in info["layers"])
        all_s = sum(x["out_features"] * x["in_features"] for x in info["layers"])
        args.initial_threshold = args.final_threshold = max(kept_s, 1) / all_s
        ranks = [x["rank"] for x in info["layers"]]
        logger.info(f"One-shot allocation: {info['stored']} stored parameters of a budget of {info['budget']} "
                    f"({budget:.4f} of the replaced matrices); ranks {min(ranks)}-{max(ranks)}; kept rows of S: "
                    f"{args.final_threshold:.6f} of S (the Pruner's --initial_threshold / --final_threshold from here)")
    elif not args.no_losparse:
        try:
            replaced = utils.substitute_layer_weights(module=model,
                                                      allow_name=allow_name,
                                                      block_name=block_name,
                                                      parameter_ratio=args.low_rank_parameter_ratio,
                                                      do_svd=args.eval_checkpoint is None and checkpoint_path is None,
                                                      svd=args.svd,
                                                      input_cov=input_cov if args.init == "calibrated" else None)
        except (TypeError, ValueError, RuntimeError) as e:
            raise SystemExit(f"run_clm.py: error: {e}")
        if not replaced:
            raise SystemExit(f"run_clm.py: error: STEP 1 replaced no nn.Linear with allow_name {allow_name}; pass "
                             "--allow_name with the names of the model's projections")
        if args.one_shot and checkpoint_path is None:  # keep --final_threshold of S: the rows with the most output
            utils.one_shot_rows(model, input_cov, args.final_threshold)  # energy, all layers together
        del input_cov
    if checkpoint_path is not None and allocates:  # each layer at the rank and rows of the checkpoint (the others
        try:  # have the ranks STEP 1 gives; accelerator.load_state fills every weight)
            utils.load_checkpoint(model, checkpoint_path)
        except (utils.CheckpointMismatchError, utils.CheckpointFileError, FileNotFoundError) as e:
            raise SystemExit(f"run_clm.py: error: --resume_from_checkpoint {checkpoint_path}: {e}")
        # the Pruner goes on at the fraction of S the allocation kept (its nonzero rows)
        layers = [m for m in model.modules() if isinstance(m, utils.LinearLoSparse)]
        kept_s = sum(m.kept_rows * m.in_feature for m in layers)
        all_s = sum(m.out_feature * m.in_feature for m in layers)
        args.initial_threshold = args.final_threshold = max(kept_s, 1) / all_s
        logger.info(f"One-shot allocation of {checkpoint_path}: kept rows of S: {args.final_threshold:.6f} of S")
    if args.eval_checkpoint is not None:
        try:
            utils.load_checkpoint(model, args.eval_checkpoint)
        except (utils.CheckpointMismatchError, utils.CheckpointFileError, FileNotFoundError) as e:
            raise SystemExit(f"run_clm.py: error: --eval_checkpoint {args.eval_checkpoint}: {e}")

    # Log a few random samples from the training set:
    if train_dataset is not None:
        for index in random.sample(range(len(train_dataset)), min(3, len(train_dataset))):
            logger.info(f"Sample {index} of the training set: {tokenizer.decode(train_dataset[index]['input_ids'])!r}.")

    # DataLoaders creation. Every DataLoader has its own generator: iterating one never draws from the global RNG
    # (which dropout uses), and the training order of epoch e is reseeded to data_seed + e, so a resume is exact.
    eval_dataloader = DataLoader(eval_dataset, collate_fn=default_data_collator,
                                 batch_size=args.per_device_eval_batch_size, generator=torch.Generator())
    fsdp2 = args.fsdp2 or getattr(accelerator, "is_fsdp2", False)  # bigger than one GPU: ranks hold whole rows
    if fsdp2:
        model = utils.apply_fsdp2(model, accelerator)
    pruner, train_state = None, None
    if do_train:
        train_generator = torch.Generator()
        train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=default_data_collator,
                                      batch_size=args.per_device_train_batch_size, generator=train_generator)

        # Optimizer
        # Split weights in two groups, one with weight decay and the other not.
        no_decay = ["bias", "layer_norm.weight", "LayerNorm.weight", "norm.weight"]
        optimizer_grouped_parameters = [
            {"params": [p for n, p in model.named_parameters() if p.requires_grad and not any(nd in n for nd in no_decay)],
             "weight_decay": args.weight_decay},
            {"params": [p for n, p in model.named_parameters() if p.requires_grad and any(nd in n for nd in no_decay)],
             "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(optimizer_grouped_parameters, lr=args.learning_rate)

        # Prepare everything with our `accelerator`; the train dataloader first, its length may change.
        model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
        if fsdp2:  # FSDP2: save_state writes full, 1-process files
            utils.fsdp2_checkpointing(accelerator, model, optimizer)

        # Scheduler and math around the number of training steps.
        num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
        args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
        if not args.no_losparse:
            try:
                utils.validate_losparse_args(args, total_step=args.max_train_steps)
            except ValueError as e:
                raise SystemExit(f"run_clm.py: error: {e}")
            if args.final_warmup * args.warmup_steps < 2:
                logger.warning("--final_warmup x --warmup_steps < 2: the last steps do not all mask, so the final "
                               "model may keep more than --final_threshold of S")
        # The prepared scheduler steps once per process at every optimizer step.
        lr_scheduler = get_scheduler(name=args.lr_scheduler_type, optimizer=optimizer,
                                     num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                                     num_training_steps=args.max_train_steps * accelerator.num_processes)
        lr_scheduler = accelerator.prepare(lr_scheduler)

        train_state = TrainState(data_seed)
        accelerator.register_for_checkpointing(train_state)

        # ===== STEP 2: Setup Pruner =====
        # Before the (optional) resume, so that load_state restores its statistics with the rest of the state.
        if not args.no_losparse:
            pruner = utils.Pruner(model=model,
                                  args=args,
                                  total_step=args.max_train_steps,
                                  mask_param_name=["sparse"],
                                  pruner_name=args.pruner_name,
                                  structured_method=args.structured_method,
                                  structured_direction=args.structured_direction,
                                  keep_zero_rows=args.one_shot)  # rows pruned in STEP 1 stay pruned
            accelerator.register_for_checkpointing(pruner)
    else:
        model = accelerator.prepare(model)
    eval_dataloader = accelerator.prepare(eval_dataloader)
    one_shot_metrics = None

    def evaluate():
        """Token-weighted: exp(sum of the next-token losses over all eval blocks / number of predicted tokens)."""
        model.eval()
        loss_sum, n_tokens = 0.0, 0
        for batch in eval_dataloader:
            with torch.no_grad():
                outputs = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            sums, counts = token_losses(outputs.logits, batch["labels"])
            sums, counts = accelerator.gather_for_metrics((sums, counts))
            loss_sum += float(sums.double().sum())
            n_tokens += int(counts.sum())
        model.train()
        perplexity, eval_loss = perplexity_of(loss_sum, n_tokens)
        return {"perplexity": perplexity, "eval_loss": eval_loss, "eval_tokens": n_tokens}

    def report_line(step, metrics, threshold, epoch=None):
        report = utils.compression_report(model)
        thr = "n/a" if threshold is None else f"{threshold:.4f}"
        where = f"epoch {epoch} " if epoch is not None else ""
        logger.info(f"{where}step {step}: perplexity: {metrics['perplexity']:.4f} eval_loss: "
                    f"{metrics['eval_loss']:.4f} | threshold {thr} | effective ratio {report.effective_ratio:.4f}")
        return report

    # Figure out how many steps we should save the Accelerator states
    checkpointing_steps = args.checkpointing_steps
    if checkpointing_steps is not None and checkpointing_steps.isdigit():
        checkpointing_steps = int(checkpointing_steps)

    if args.one_shot and do_train and checkpoint_path is None:  # the perplexity before any training
        one_shot_metrics = evaluate()
        logger.info(f"one-shot (no training): perplexity {one_shot_metrics['perplexity']:.4f}")

    completed_steps = 0
    threshold = None if pruner is None else args.initial_threshold
    last_eval, last_eval_step = None, None
    train_runtime, train_loss_sum, train_loss_batches = 0.0, 0.0, 0

    if do_train:
        # We need to initialize the trackers we use, and also store our configuration.
        if args.with_tracking:
            experiment_config = {k: (v.value if isinstance(v, SchedulerType) else v) for k, v in vars(args).items()
                                 if not isinstance(v, list)}
            accelerator.init_trackers("clm_no_trainer", experiment_config)

        # Train!
        total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info("***** Running training *****")
        logger.info(f"  Num examples = {len(train_dataset)} blocks of {block_size} tokens")
        logger.info(f"  Num Epochs = {args.num_train_epochs}")
        logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size}")
        logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
        logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
        logger.info(f"  Total optimization steps = {args.max_train_steps}")
        # Only show the progress bar once on each machine.
        progress_bar = tqdm(range(args.max_train_steps), disable=not accelerator.is_local_main_process)
        starting_epoch, resume_batches = 0, 0
        # Potentially load in the weights and states from a previous save (checkpoint_path: found before STEP 1)
        if checkpoint_path:
            accelerator.print(f"Resumed from checkpoint: {checkpoint_path}")
            # One-shot allocations: utils.load_checkpoint loaded the model strictly in STEP 1; safetensors keeps the
            # empty L and R of a rank-0 layer once, as shared storage, which accelerate's strict load refuses.
            accelerator.load_state(checkpoint_path, **({"strict": False} if allocates else {}))
            completed_steps = train_state.completed_steps
            data_seed = train_state.data_seed
            # Optimizer steps -> (epoch, batches into it): every epoch ends with a (possibly short) accumulation.
            starting_epoch = completed_steps // num_update_steps_per_epoch
            resume_batches = (completed_steps % num_update_steps_per_epoch) * args.gradient_accumulation_steps
            if pruner is not None:
                threshold = pruner.schedule_threshold_comb(max(completed_steps - 1, 0))[0]
        # update the progress_bar if load from checkpoint
        progress_bar.update(completed_steps)

        def save_state(name):
            train_state.completed_steps = completed_steps
            output_dir = name if args.output_dir is None else os.path.join(args.output_dir, name)
            utils.save_state_atomic(accelerator, output_dir)

        def eval_and_log(epoch):
            nonlocal last_eval, last_eval_step
            metrics = evaluate()
            report = report_line(completed_steps, metrics, threshold, epoch)
            if args.with_tracking:
                log = {"perplexity": metrics["perplexity"], "eval_loss": metrics["eval_loss"],
                       "effective_ratio": report.effective_ratio, "epoch": epoch, "step": completed_steps}
                if threshold is not None:
                    log["threshold"] = threshold
                if train_loss_batches:
                    log["train_loss"] = train_loss_sum / train_loss_batches
                accelerator.log(log, step=completed_steps)
            last_eval, last_eval_step = metrics, completed_steps

        start_time = time.time()
        model.train()
        for epoch in range(starting_epoch, args.num_train_epochs):
            model.train()
            train_generator.manual_seed(data_seed + epoch)
            if epoch == starting_epoch and resume_batches:
                # We skip the first `n` batches in the dataloader when resuming from a checkpoint
                active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
            else:
                active_dataloader = train_dataloader
            for batch in active_dataloader:
                with accelerator.accumulate(model):
                    outputs = model(**batch)
                    loss = outputs.loss
                    train_loss_sum += float(loss.detach())
                    train_loss_batches += 1
                    accelerator.backward(loss)
                    optimizer.step()
                    if pruner is not None and accelerator.sync_gradients:
                        # ===== STEP 3: Prune During Training =====
                        # After optimizer.step() and before zero_grad(), once per optimizer step.
                        threshold, mask_threshold = pruner.update_and_pruning(model, completed_steps)
                    lr_scheduler.step()
                    optimizer.zero_grad()

                # Checks if the accelerator has performed an optimization step behind the scenes
                if accelerator.sync_gradients:
                    progress_bar.update(1)
                    completed_steps += 1
                    if isinstance(checkpointing_steps, int) and completed_steps % checkpointing_steps == 0:
                        save_state(f"step_{completed_steps}")
                    if args.eval_steps is not None and completed_steps % args.eval_steps == 0:
                        eval_and_log(epoch)
                if completed_steps >= args.max_train_steps:
                    break

            if last_eval_step != completed_steps:
                eval_and_log(epoch)
            if args.checkpointing_steps == "epoch":
                save_state(f"epoch_{epoch}")
            if completed_steps >= args.max_train_steps:
                break
        train_runtime = time.time() - start_time
        progress_bar.close()

    # Final evaluation: the last one of the training loop, or one now (evaluation only).
    if last_eval is None or last_eval_step != completed_steps:
        last_eval = evaluate()
        report_line(completed_steps, last_eval, threshold)
    results = dict(last_eval)
    if args.one_shot:
        results["one_shot_perplexity"] = (one_shot_metrics or last_eval)["perplexity"]
    results["eval_blocks"] = len(eval_dataset)
    results["block_size"] = block_size

    unwrapped_model = accelerator.unwrap_model(model)
    if fsdp2:  # FSDP2: gather the full weights
        unwrapped_model = utils.fsdp2_full_model(unwrapped_model)
    report = utils.compression_report(unwrapped_model)
    if accelerator.is_main_process and not args.no_losparse:
        logger.info("LoSparse compression report\n" + report.table())
    results.update({"effective_ratio": report.effective_ratio, "model_params": report.model_params,
                    "dense_equivalent_params": report.model_params_dense_equivalent,
                    "train_runtime_s": round(train_runtime, 3), "train_steps": completed_steps})
    if train_loss_batches:
        results["train_loss"] = train_loss_sum / train_loss_batches
    if args.with_tracking and do_train:
        accelerator.log({k: v for k, v in results.items() if isinstance(v, (int, float))}, step=completed_steps)
        accelerator.end_training()

    if args.output_dir is not None:
        accelerator.wait_for_everyone()
        saves = do_train or args.one_shot  # --one_shot --num_train_epochs 0: the compressed model is the output
        if saves:
            unwrapped_model.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                                            save_function=accelerator.save)
        if accelerator.is_main_process:
            if saves:
                tokenizer.save_pretrained(args.output_dir)
                if not args.no_losparse:
                    # The original key layout (left/right/sparse), what --eval_checkpoint loads.
                    utils.save_checkpoint(unwrapped_model, os.path.join(args.output_dir, "pytorch_model.bin"))
                    utils.export_compact(unwrapped_model, os.path.join(args.output_dir, "compact"),
                                         tokenizer=tokenizer, losparse_args=args)
            with open(os.path.join(args.output_dir, "all_results.json"), "w") as f:
                json.dump(results, f, indent=4)
            if args.push_to_hub and do_train:
                from huggingface_hub import HfApi

                HfApi().upload_folder(commit_message="End of training", folder_path=args.output_dir,
                                      repo_id=repo_id, repo_type="model", token=args.hub_token,
                                      ignore_patterns=["step_*", "epoch_*"])
    accelerator.print(json.dumps(results))
    return results


if __name__ == "__main__":
    with utils.one_line_errors("run_clm.py"):
        main()
