#!/usr/bin/env python
# coding=utf-8
"""Fine-tune and compress a transformers model for sequence classification (GLUE or local csv/json) with LoSparse.

The shape of Hugging Face's ``examples/pytorch/text-classification/run_glue_no_trainer.py`` (Accelerate, argparse,
tqdm, trackers, checkpointing) with the three LoSparse hooks marked ``STEP 1/2/3``. Knowledge distillation of a
pruned model (the original's ``run_glue_distil.py``) is part of this script: pass ``--teacher_path`` and
``--stored_model_path``.

    # compress while fine-tuning (low-rank 5 % + 15 % of the rows of S)
    python run_glue.py --model_name_or_path microsoft/deberta-v3-base --task_name mnli \\
        --low_rank_parameter_ratio 0.05 --final_threshold 0.15 --warmup_steps 675 --final_warmup 5 --output_dir out
    # distil the pruned model with a fine-tuned teacher, without further pruning
    python run_glue.py --model_name_or_path bert-base-uncased --task_name mnli --stored_model_path out/pytorch_model.bin \\
        --teacher_path textattack/bert-base-uncased-MNLI --alpha_output 0 --alpha_layer 15 --output_dir out_kd
    # evaluate a checkpoint in the original format
    python run_glue.py --model_name_or_path microsoft/deberta-v3-base --task_name mnli \\
        --eval_checkpoint deberta_mnli_20.bin --num_train_epochs 0 --output_dir eval_out
"""
import argparse
import json
import logging
import math
import os
import random
import re
import time

import datasets
import numpy as np
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
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PretrainedConfig,
    SchedulerType,
    default_data_collator,
    get_scheduler,
)

import utils

logger = get_logger(__name__)

task_to_keys = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
GLUE_HUB_ID = "nyu-mll/glue"
DATA_EXTENSIONS = ("csv", "json", "jsonl")
CHECKPOINT_DIR = re.compile(r"^(step|epoch)_(\d+)$")

# STEP 1 allow / block lists: the original's, plus DeBERTa's query_proj / key_proj / value_proj.
ALLOW_NAME = ["query", "key", "value", "q_proj", "k_proj", "v_proj", "out_proj", "dense", "attention", "fc1", "fc2",
              "query_proj", "key_proj", "value_proj"]
BLOCK_NAME = ["pooler", "classifier", "LayerNorm", "embeddings"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Finetune and compress (LoSparse) a transformers model on a text "
                                                 "classification task")
    parser.add_argument("--task_name", type=str.lower, default=None, choices=list(task_to_keys.keys()),
                        help="The name of the glue task to train on (loaded from the Hub, or from --train_file / "
                             "--validation_file when given: local copies of the task).")
    parser.add_argument("--train_file", type=str, default=None, help="A csv or a json file containing the training data.")
    parser.add_argument("--validation_file", type=str, default=None,
                        help="A csv or a json file containing the validation data.")
    parser.add_argument("--max_length", type=int, default=128,
                        help="The maximum total input sequence length after tokenization. Sequences longer than this "
                             "will be truncated, sequences shorter will be padded if `--pad_to_max_length` is passed.")
    parser.add_argument("--pad_to_max_length", action="store_true",
                        help="If passed, pad all samples to `max_length`. Otherwise, dynamic padding is used.")
    parser.add_argument("--model_name_or_path", type=str, required=True,
                        help="Path to pretrained model or model identifier from huggingface.co/models.")
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
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="Overrides `accelerate launch --mixed_precision` / the accelerate config.")
    parser.add_argument("--push_to_hub", action="store_true", help="Whether or not to push the model to the Hub.")
    parser.add_argument("--hub_model_id", type=str,
                        help="The name of the repository to keep in sync with the local `output_dir`.")
    parser.add_argument("--hub_token", type=str, help="The token to use to push to the Model Hub.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow custom models defined on the Hub in their own modeling files.")
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
    parser.add_argument("--ignore_mismatched_sizes", action="store_true",
                        help="Whether or not to enable to load a pretrained model whose head dimensions are different.")
    kd = parser.add_argument_group("Knowledge distillation (the original run_glue_distil.py)")
    kd.add_argument("--stored_model_path", type=str, default=None,
                    help="The pruned model to distil: a pytorch_model.bin written by a previous run of this script "
                         "(original key layout). It is loaded after STEP 1, compacted with utils.prune and trained "
                         "without further pruning.")
    kd.add_argument("--teacher_path", type=str, default=None,
                    help="The fine-tuned teacher (a directory or Hub id loadable by "
                         "AutoModelForSequenceClassification). Needs --stored_model_path.")
    kd.add_argument("--alpha_output", type=float, default=1.0,
                    help="Weight of KL(softmax(teacher/T) || softmax(student/T)) * T^2 (MSE of logits for regression).")
    kd.add_argument("--alpha_layer", type=float, default=1.0,
                    help="Weight of the sum over all hidden states of MSE(student, teacher).")
    kd.add_argument("--temperature", type=float, default=2.0, help="Softmax temperature T of the output term.")
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
    if args.task_name is None and not local:
        parser.error("need either --task_name or --train_file/--validation_file")
    if args.task_name is None or local:
        if _trains(args) and args.train_file is None:
            parser.error("--train_file is required to train on local files (or pass --num_train_epochs 0 to only "
                         "evaluate, or --task_name to load a GLUE task from the Hub)")
        if args.validation_file is None:
            parser.error("--validation_file is required with local files: the script reports metrics on it")
    extensions = set()
    for flag in ("train_file", "validation_file"):
        path = getattr(args, flag)
        if path is None:
            continue
        ext = _extension(path)
        if ext not in DATA_EXTENSIONS:
            parser.error(f"--{flag} should be a csv or a json file ({'/'.join(DATA_EXTENSIONS)}), got {path}")
        if not os.path.isfile(path):
            parser.error(f"--{flag} {path} does not exist")
        extensions.add("json" if ext == "jsonl" else ext)
    if len(extensions) > 1:
        parser.error("--train_file and --validation_file must have the same format (both csv or both json)")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
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
    if args.teacher_path is not None and args.stored_model_path is None:
        parser.error("--teacher_path needs --stored_model_path (the pruned model from a previous run to distil)")
    if args.stored_model_path is not None:
        if args.no_losparse:
            parser.error("--stored_model_path loads a LoSparse model: it cannot be combined with --no_losparse")
        if not os.path.exists(args.stored_model_path):
            parser.error(f"--stored_model_path {args.stored_model_path} does not exist")
    for name in ("alpha_output", "alpha_layer"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.push_to_hub and args.output_dir is None:
        parser.error("--push_to_hub needs --output_dir")


# ----------------------------------------------------------------------------------------------------
# Data and metrics
# ----------------------------------------------------------------------------------------------------
def load_raw_datasets(args):
    """GLUE from the Hub (``--task_name`` alone), or local csv/json files (label column ``label``)."""
    if args.task_name is not None and args.train_file is None and args.validation_file is None:
        return load_dataset(GLUE_HUB_ID, args.task_name)
    data_files = {}
    if args.train_file is not None:
        data_files["train"] = args.train_file
    if args.validation_file is not None:
        data_files["validation"] = args.validation_file
    extension = _extension(args.train_file or args.validation_file)
    raw = load_dataset("json" if extension == "jsonl" else extension, data_files=data_files)
    for split in raw:
        if "label" not in raw[split].column_names:
            raise SystemExit(f"run_glue.py: error: {data_files[split]} has no 'label' column "
                             f"(columns: {raw[split].column_names})")
    return raw


def compute_metrics(task_name, predictions, references, is_regression, num_labels):
    """The GLUE definitions, computed offline: accuracy; F1 for MRPC/QQP (and any binary local task); Matthews
    correlation for CoLA; Pearson/Spearman for STS-B and any regression task."""
    preds, refs = np.asarray(predictions), np.asarray(references)
    if is_regression:
        from scipy.stats import pearsonr, spearmanr

        return {"pearson": float(pearsonr(preds, refs)[0]), "spearmanr": float(spearmanr(preds, refs)[0])}
    from sklearn.metrics import f1_score, matthews_corrcoef

    if task_name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(refs, preds))}
    result = {"accuracy": float((preds == refs).mean())}
    if task_name in ("mrpc", "qqp") or (task_name is None and num_labels == 2):
        result["f1"] = float(f1_score(refs, preds, labels=[0, 1], zero_division=0.0))
    return result


def distillation_losses(student_outputs, teacher_outputs, is_regression, temperature, layer_term):
    """``KL(softmax(t/T) || softmax(s/T)) * T^2`` (MSE of logits for regression), and the sum over all hidden states
    of ``MSE(student, teacher)`` (None when ``layer_term`` is False)."""
    s, t = student_outputs.logits.float(), teacher_outputs.logits.float()
    if is_regression:
        out_loss = F.mse_loss(s, t)
    else:
        out_loss = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1),
                            reduction="batchmean") * temperature ** 2
    layer_loss = None
    if layer_term:
        hs, ht = student_outputs.hidden_states, teacher_outputs.hidden_states
        if len(hs) != len(ht):
            raise RuntimeError(f"student has {len(hs)} hidden states, teacher {len(ht)}: --alpha_layer needs the "
                               "same number of layers (or pass --alpha_layer 0)")
        layer_loss = sum(F.mse_loss(a.float(), b.float()) for a, b in zip(hs, ht))
    return out_loss, layer_loss


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


def _load_checkpoint_or_exit(model, path, flag):
    try:
        utils.load_checkpoint(model, path)
    except (utils.CheckpointMismatchError, utils.CheckpointFileError, FileNotFoundError) as e:
        raise SystemExit(f"run_glue.py: error: {flag} {path}: {e}")


def main(argv=None):
    args = parse_args(argv)
    # Paths and files first (seconds): a run that cannot read its data or write its results stops before training.
    utils.check_run_paths(args)
    distill = args.teacher_path is not None
    train_stored = args.stored_model_path is not None  # a pruned model, trained without the Pruner
    do_train = _trains(args)

    # Initialize the accelerator. We will let the accelerator handle device placement for us in this example.
    # If we're using tracking, we also need to initialize it here and it will by default pick up all supported
    # trackers in the environment.
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
            raise SystemExit(f"run_glue.py: error: {e}")

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

    # Get the datasets: a GLUE task from the Hub, or local csv/json files. For local files the label column is
    # `label`; the text columns are `sentence1`/`sentence2` if present, else the first one or two other columns.
    raw_datasets = load_raw_datasets(args)
    ref_split = "train" if "train" in raw_datasets else "validation"

    # Labels
    local_files = args.train_file is not None or args.validation_file is not None
    if args.task_name is not None and not local_files:
        is_regression = args.task_name == "stsb"
        if not is_regression:
            label_list = raw_datasets["train"].features["label"].names
            num_labels = len(label_list)
        else:
            num_labels = 1
    else:
        # Regression when the labels are floats (or the task is stsb).
        is_regression = args.task_name == "stsb" or \
            raw_datasets[ref_split].features["label"].dtype in ["float16", "float32", "float64"]
        if is_regression:
            num_labels = 1
        else:
            label_list = sorted(raw_datasets[ref_split].unique("label"))  # sorted for determinism
            num_labels = len(label_list)

    # Load pretrained model and tokenizer
    #
    # In distributed training, the .from_pretrained methods guarantee that only one local process can concurrently
    # download model & vocab.
    config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=num_labels, finetuning_task=args.task_name,
                                        trust_remote_code=args.trust_remote_code)
    tokenizer_kwargs = {"use_fast": False} if args.use_slow_tokenizer else {}
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code,
                                              **tokenizer_kwargs)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_name_or_path, config=config, ignore_mismatched_sizes=args.ignore_mismatched_sizes,
        trust_remote_code=args.trust_remote_code)

    # ===== STEP 1: Replace Matrices =====
    # Substitute weights with low rank matrix and sparse matrix. When the weights come from a file
    # (--eval_checkpoint, --stored_model_path) the SVD is skipped and each layer takes the rank found in the file.
    weights_from_file = args.eval_checkpoint is not None or train_stored
    if not args.no_losparse:
        utils.substitute_layer_weights(module=model,
                                       allow_name=ALLOW_NAME,
                                       block_name=BLOCK_NAME,
                                       parameter_ratio=args.low_rank_parameter_ratio,
                                       do_svd=not weights_from_file,
                                       svd=args.svd)
    if train_stored:
        _load_checkpoint_or_exit(model, args.stored_model_path, "--stored_model_path")
        utils.prune(model)  # keep only the nonzero rows (or columns) of S; they are trained, no further pruning
    if args.eval_checkpoint is not None:
        _load_checkpoint_or_exit(model, args.eval_checkpoint, "--eval_checkpoint")

    teacher = None
    if distill and do_train:
        teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher_path,
                                                                     trust_remote_code=args.trust_remote_code)
        if teacher.config.num_labels != num_labels:
            raise SystemExit(f"run_glue.py: error: --teacher_path {args.teacher_path} has {teacher.config.num_labels} "
                             f"labels, the task has {num_labels}")
        if args.alpha_layer > 0:
            t_shape = (getattr(teacher.config, "num_hidden_layers", None), getattr(teacher.config, "hidden_size", None))
            s_shape = (getattr(model.config, "num_hidden_layers", None), getattr(model.config, "hidden_size", None))
            if None not in t_shape + s_shape and t_shape != s_shape:
                raise SystemExit(f"run_glue.py: error: --alpha_layer compares all hidden states, but the teacher has "
                                 f"(layers, hidden size) {t_shape} and the student {s_shape}; pass --alpha_layer 0")
        teacher.requires_grad_(False)
        teacher.eval()
        teacher.to(accelerator.device)
    elif distill:
        logger.info("--num_train_epochs 0: evaluation only, the teacher is not loaded")

    # Preprocessing the datasets
    if args.task_name is not None:
        sentence1_key, sentence2_key = task_to_keys[args.task_name]
    else:
        # Again, we try to have some nice defaults but don't hesitate to tweak to your use case.
        non_label_column_names = [name for name in raw_datasets[ref_split].column_names if name != "label"]
        if "sentence1" in non_label_column_names and "sentence2" in non_label_column_names:
            sentence1_key, sentence2_key = "sentence1", "sentence2"
        elif len(non_label_column_names) >= 2:
            sentence1_key, sentence2_key = non_label_column_names[:2]
        else:
            sentence1_key, sentence2_key = non_label_column_names[0], None
    for split in raw_datasets:
        missing = [k for k in (sentence1_key, sentence2_key) if k is not None and k not in raw_datasets[split].column_names]
        if missing:
            raise SystemExit(f"run_glue.py: error: the {split} data has no column {missing} "
                             f"(columns: {raw_datasets[split].column_names})")

    # Some models have set the order of the labels to use, so let's make sure we do use it.
    label_to_id = None
    if (model.config.label2id != PretrainedConfig(num_labels=num_labels).label2id and args.task_name is not None
            and not local_files and not is_regression):
        # Some have all caps in their config, some don't.
        label_name_to_id = {k.lower(): v for k, v in model.config.label2id.items()}
        if sorted(label_name_to_id.keys()) == sorted(label_list):
            logger.info(f"The configuration of the model provided the following label correspondence: "
                        f"{label_name_to_id}. Using it!")
            label_to_id = {i: label_name_to_id[label_list[i]] for i in range(num_labels)}
        else:
            logger.warning(f"Your model seems to have been trained with labels, but they don't match the dataset: "
                           f"model labels: {sorted(label_name_to_id.keys())}, dataset labels: {sorted(label_list)}."
                           "\nIgnoring the model labels as a result.")
    elif (args.task_name is None or local_files) and not is_regression:
        label_to_id = {v: i for i, v in enumerate(label_list)}

    if label_to_id is not None:
        model.config.label2id = label_to_id
        model.config.id2label = {id: label for label, id in model.config.label2id.items()}
    elif args.task_name is not None and not is_regression:
        model.config.label2id = {l: i for i, l in enumerate(label_list)}
        model.config.id2label = {id: label for label, id in model.config.label2id.items()}

    padding = "max_length" if args.pad_to_max_length else False

    def preprocess_function(examples):
        # Tokenize the texts
        texts = (examples[sentence1_key],) if sentence2_key is None else (examples[sentence1_key],
                                                                          examples[sentence2_key])
        result = tokenizer(*texts, padding=padding, max_length=args.max_length, truncation=True)
        if "label" in examples:
            if label_to_id is not None:
                # Map labels to IDs (not necessary for GLUE tasks)
                result["labels"] = [label_to_id[l] for l in examples["label"]]
            else:
                # In all cases, rename the column to labels because the model will expect that.
                result["labels"] = examples["label"]
        return result

    # MNLI is evaluated on validation_matched and, at the end, validation_mismatched. Only the splits in use are
    # tokenized (not the train split of an evaluation-only run, nor GLUE's unlabelled test splits).
    eval_splits = ["validation_matched", "validation_mismatched"] if "validation_matched" in raw_datasets \
        else ["validation"]
    processed_datasets = {}
    with accelerator.main_process_first():
        for split in (["train"] if do_train else []) + eval_splits:
            processed_datasets[split] = raw_datasets[split].map(
                preprocess_function, batched=True, remove_columns=raw_datasets[split].column_names,
                desc=f"Running tokenizer on the {split} split")
    train_dataset = processed_datasets["train"] if do_train else None

    # Log a few random samples from the training set:
    if train_dataset is not None:
        for index in random.sample(range(len(train_dataset)), min(3, len(train_dataset))):
            logger.info(f"Sample {index} of the training set: {train_dataset[index]}.")

    # DataLoaders creation:
    if args.pad_to_max_length:
        # If padding was already done ot max length, we use the default data collator that will just convert
        # everything to tensors.
        data_collator = default_data_collator
    else:
        # Otherwise, `DataCollatorWithPadding` will apply dynamic padding for us (by padding to the maximum length of
        # the samples passed). When using mixed precision, we add `pad_to_multiple_of=8` to pad all tensors to
        # multiple of 8s, which will enable the use of Tensor Cores on NVIDIA hardware.
        pad_to = 8 if accelerator.mixed_precision != "no" else None
        data_collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to)

    # Every DataLoader has its own generator: iterating one never draws from the global RNG (which dropout uses),
    # and the training order of epoch e is reseeded to data_seed + e, so a resumed run is bit-exact.
    eval_dataloaders = {split: DataLoader(processed_datasets[split], collate_fn=data_collator,
                                          batch_size=args.per_device_eval_batch_size, generator=torch.Generator())
                        for split in eval_splits}
    fsdp2 = args.fsdp2 or getattr(accelerator, "is_fsdp2", False)  # bigger than one GPU: ranks hold whole rows
    if fsdp2:
        model = utils.apply_fsdp2(model, accelerator)
    pruner, train_state = None, None
    if do_train:
        train_generator = torch.Generator()
        train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=data_collator,
                                      batch_size=args.per_device_train_batch_size, generator=train_generator)

        # Optimizer
        # Split weights in two groups, one with weight decay and the other not.
        no_decay = ["bias", "LayerNorm.weight"]
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
        if not args.no_losparse and not train_stored:
            try:
                utils.validate_losparse_args(args, total_step=args.max_train_steps)
            except ValueError as e:
                raise SystemExit(f"run_glue.py: error: {e}")
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
        if not args.no_losparse and not train_stored:
            pruner = utils.Pruner(model=model,
                                  args=args,
                                  total_step=args.max_train_steps,
                                  mask_param_name=["sparse"],
                                  pruner_name=args.pruner_name,
                                  structured_method=args.structured_method,
                                  structured_direction=args.structured_direction)
            accelerator.register_for_checkpointing(pruner)
    else:
        model = accelerator.prepare(model)
    eval_dataloaders = {split: accelerator.prepare(dl) for split, dl in eval_dataloaders.items()}

    def evaluate(split):
        model.eval()
        predictions, references = [], []
        for batch in eval_dataloaders[split]:
            with torch.no_grad():
                outputs = model(**batch)
            logits = outputs.logits.float()
            preds = logits.squeeze(-1) if is_regression else logits.argmax(dim=-1)
            preds, refs = accelerator.gather_for_metrics((preds, batch["labels"]))
            predictions.append(preds.cpu())
            references.append(refs.cpu())
        model.train()
        return compute_metrics(args.task_name, torch.cat(predictions).numpy(), torch.cat(references).numpy(),
                               is_regression, num_labels)

    def report_line(step, metrics, threshold, extra=""):
        report = utils.compression_report(model)
        shown = {k: round(v, 4) for k, v in metrics.items()}
        thr = "n/a" if threshold is None else f"{threshold:.4f}"
        logger.info(f"step {step}: eval {shown} | threshold {thr} | effective ratio {report.effective_ratio:.4f}"
                    f"{extra}")
        return report

    # Figure out how many steps we should save the Accelerator states
    checkpointing_steps = args.checkpointing_steps
    if checkpointing_steps is not None and checkpointing_steps.isdigit():
        checkpointing_steps = int(checkpointing_steps)

    completed_steps = 0
    threshold = None if pruner is None else args.initial_threshold
    last_eval, last_eval_step = None, None
    kd_sums = {"task_loss": 0.0, "kd_output_loss": 0.0, "kd_layer_loss": 0.0, "batches": 0}
    kd_window = dict(kd_sums)
    train_runtime = 0.0

    if do_train:
        # We need to initialize the trackers we use, and also store our configuration.
        # The trackers initializes automatically on the main process.
        if args.with_tracking:
            experiment_config = {k: (v.value if isinstance(v, SchedulerType) else v) for k, v in vars(args).items()}
            accelerator.init_trackers("glue_no_trainer", experiment_config)

        # Train!
        total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info("***** Running training *****")
        logger.info(f"  Num examples = {len(train_dataset)}")
        logger.info(f"  Num Epochs = {args.num_train_epochs}")
        logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size}")
        logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
        logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
        logger.info(f"  Total optimization steps = {args.max_train_steps}")
        if distill:
            logger.info(f"  Distillation from {args.teacher_path}: alpha_output {args.alpha_output}, alpha_layer "
                        f"{args.alpha_layer}, temperature {args.temperature}")
        # Only show the progress bar once on each machine.
        progress_bar = tqdm(range(args.max_train_steps), disable=not accelerator.is_local_main_process)
        starting_epoch, resume_batches = 0, 0
        # Potentially load in the weights and states from a previous save
        checkpoint_path = args.resume_from_checkpoint
        if checkpoint_path == "latest":  # e.g. a job that is resubmitted until it finishes
            checkpoint_path = _latest_checkpoint(args.output_dir)
            if checkpoint_path is None:
                logger.info(f"--resume_from_checkpoint latest: no step_N / epoch_N folder in {args.output_dir} yet, "
                            "starting from scratch")
        if checkpoint_path:
            accelerator.print(f"Resumed from checkpoint: {checkpoint_path}")
            accelerator.load_state(checkpoint_path)
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
            utils.save_state_atomic(accelerator, output_dir)  # step_N.incomplete, renamed to step_N when complete

        def eval_and_log(epoch):
            nonlocal last_eval, last_eval_step, kd_window
            metrics = evaluate(eval_splits[0])
            extra = ""
            if distill and kd_window["batches"]:
                n = kd_window["batches"]
                extra = (f" | task loss {kd_window['task_loss'] / n:.4f} | kd output loss "
                         f"{kd_window['kd_output_loss'] / n:.4f} | kd layer loss {kd_window['kd_layer_loss'] / n:.4f}")
            report = report_line(completed_steps, metrics, threshold, extra)
            if args.with_tracking:
                log = {f"eval_{k}": v for k, v in metrics.items()}
                log.update({"effective_ratio": report.effective_ratio, "epoch": epoch, "step": completed_steps})
                if threshold is not None:
                    log["threshold"] = threshold
                if kd_window["batches"]:
                    n = kd_window["batches"]
                    log.update({k: kd_window[k] / n for k in ("task_loss", "kd_output_loss", "kd_layer_loss")})
                accelerator.log(log, step=completed_steps)
            kd_window = {k: 0.0 if k != "batches" else 0 for k in kd_window}
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
                    if distill:
                        layer_term = args.alpha_layer > 0
                        outputs = model(**batch, output_hidden_states=layer_term)
                        teacher_batch = {k: v for k, v in batch.items() if k != "labels"}
                        with torch.no_grad(), accelerator.autocast():
                            teacher_outputs = teacher(**teacher_batch, output_hidden_states=layer_term)
                        task_loss = outputs.loss
                        kd_out, kd_layer = distillation_losses(outputs, teacher_outputs, is_regression,
                                                               args.temperature, layer_term)
                        loss = task_loss + args.alpha_output * kd_out
                        if kd_layer is not None:
                            loss = loss + args.alpha_layer * kd_layer
                        terms = {"task_loss": task_loss, "kd_output_loss": kd_out,
                                 "kd_layer_loss": kd_layer if kd_layer is not None else torch.zeros(())}
                        for k, v in terms.items():
                            v = float(v.detach())
                            kd_sums[k] += v
                            kd_window[k] += v
                        kd_sums["batches"] += 1
                        kd_window["batches"] += 1
                    else:
                        outputs = model(**batch)
                        loss = outputs.loss
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

    # Final evaluation: the last one of the training loop, or one now (evaluation only). MNLI also reports the
    # mismatched validation set.
    if last_eval is None or last_eval_step != completed_steps:
        last_eval = evaluate(eval_splits[0])
        report_line(completed_steps, last_eval, threshold)
    results = {f"eval_{k}": v for k, v in last_eval.items()}
    if len(eval_splits) > 1:
        mm = evaluate(eval_splits[1])
        logger.info(f"mnli-mm: {mm}")
        results.update({f"eval_{k}_mm": v for k, v in mm.items()})

    unwrapped_model = accelerator.unwrap_model(model)
    if fsdp2:  # FSDP2: gather the full weights
        unwrapped_model = utils.fsdp2_full_model(unwrapped_model)
    report = utils.compression_report(unwrapped_model)
    if accelerator.is_main_process:
        logger.info("LoSparse compression report\n" + report.table())
    results.update({"effective_ratio": report.effective_ratio, "model_params": report.model_params,
                    "dense_equivalent_params": report.model_params_dense_equivalent,
                    "train_runtime_s": round(train_runtime, 3), "train_steps": completed_steps})
    if distill and kd_sums["batches"]:
        n = kd_sums["batches"]
        results.update({f"train_{k}": kd_sums[k] / n for k in ("task_loss", "kd_output_loss", "kd_layer_loss")})
    if args.with_tracking and do_train:
        accelerator.log({k: v for k, v in results.items() if isinstance(v, (int, float))}, step=completed_steps)
        accelerator.end_training()

    if args.output_dir is not None:
        accelerator.wait_for_everyone()
        if do_train:
            unwrapped_model.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                                            save_function=accelerator.save)
        if accelerator.is_main_process:
            if do_train:
                tokenizer.save_pretrained(args.output_dir)
                # The original key layout (left/right/sparse), what --eval_checkpoint and --stored_model_path load.
                utils.save_checkpoint(unwrapped_model, os.path.join(args.output_dir, "pytorch_model.bin"))
                if not args.no_losparse:
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
    with utils.one_line_errors("run_glue.py"):
        main()
