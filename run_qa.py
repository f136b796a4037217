#!/usr/bin/env python
# coding=utf-8
"""Fine-tune and compress a transformers model on SQuAD v1.1 / v2.0 with LoSparse, using Accelerate.

The shape of Hugging Face's ``examples/pytorch/question-answering/run_qa_no_trainer.py`` with the three LoSparse
hooks (STEP 1-3 banners). The post-processing of logits and the official SQuAD metric live in ``utils_qa.py``.

    python run_qa.py --model_name_or_path microsoft/deberta-v3-base --dataset_name squad \\
        --low_rank_parameter_ratio 0.05 --final_threshold 0.15 --warmup_steps 5400 --output_dir out/squad
    python run_qa.py --model_name_or_path microsoft/deberta-v3-base --dataset_name squad \\
        --num_train_epochs 0 --eval_checkpoint out/squad/pytorch_model.bin --output_dir out/squad_eval
"""
import argparse
import functools
import json
import logging
import math
import os
import re
import time

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import transformers
from transformers import (
    CONFIG_MAPPING,
    MODEL_MAPPING,
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    DataCollatorWithPadding,
    SchedulerType,
    default_data_collator,
    get_scheduler,
)

import utils
from utils_qa import (
    load_squad_file,
    postprocess_qa_predictions,
    prepare_train_features,
    prepare_validation_features,
    references_from_examples,
    squad_evaluate,
)

logger = get_logger(__name__)
MODEL_CONFIG_CLASSES = list(MODEL_MAPPING.keys())
MODEL_TYPES = tuple(conf.model_type for conf in MODEL_CONFIG_CLASSES)
DATA_EXTENSIONS = ("json", "jsonl", "csv")
CHECKPOINT_DIR = re.compile(r"^(step|epoch)_(\d+)$")

# STEP 1 allow / block lists: the original's, plus DeBERTa's query_proj / key_proj / value_proj.
ALLOW_NAME = ["query", "key", "value", "q_proj", "k_proj", "v_proj", "out_proj", "dense", "attention", "fc1", "fc2",
              "query_proj", "key_proj", "value_proj"]
BLOCK_NAME = ["pooler", "classifier", "LayerNorm", "embeddings"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Fine-tune and compress a transformers model on a question "
                                                 "answering task (SQuAD v1.1 / v2.0) with LoSparse")
    parser.add_argument("--dataset_name", type=str, default=None,
                        help="The name of the dataset to use (via the datasets library): squad or squad_v2.")
    parser.add_argument("--dataset_config_name", type=str, default=None,
                        help="The configuration name of the dataset to use (via the datasets library).")
    parser.add_argument("--train_file", type=str, default=None,
                        help="A local SQuAD-format json/jsonl/csv file with the training data.")
    parser.add_argument("--validation_file", type=str, default=None,
                        help="A local SQuAD-format json/jsonl/csv file with the evaluation data.")
    parser.add_argument("--test_file", type=str, default=None,
                        help="A local SQuAD-format json/jsonl/csv file to predict on (with --do_predict).")
    parser.add_argument("--do_predict", action="store_true", help="Also predict on the test split.")
    parser.add_argument("--preprocessing_num_workers", type=int, default=1,
                        help="The number of processes to use for the preprocessing.")
    parser.add_argument("--max_seq_length", type=int, default=384,
                        help="The maximum total input sequence length after tokenization. Longer contexts are split "
                             "into overlapping windows; shorter ones are padded if --pad_to_max_length is passed.")
    parser.add_argument("--pad_to_max_length", action="store_true",
                        help="If passed, pad all samples to `max_seq_length`. Otherwise, dynamic padding is used.")
    parser.add_argument("--model_name_or_path", type=str, default=None,
                        help="Path to pretrained model or model identifier from huggingface.co/models.")
    parser.add_argument("--config_name", type=str, default=None,
                        help="Pretrained config name or path if not the same as model_name")
    parser.add_argument("--tokenizer_name", type=str, default=None,
                        help="Pretrained tokenizer name or path if not the same as model_name")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow custom models defined on the Hub in their own modeling files.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8,
                        help="Batch size (per device) for the training dataloader.")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=8,
                        help="Batch size (per device) for the evaluation dataloader.")
    parser.add_argument("--learning_rate", type=float, default=5e-5,
                        help="Initial learning rate (after the potential warmup period) to use.")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="Weight decay to use.")
    parser.add_argument("--num_train_epochs", type=int, default=3,
                        help="Total number of training epochs to perform; 0 only evaluates.")
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
    parser.add_argument("--doc_stride", type=int, default=128,
                        help="When splitting up a long document into chunks how much stride to take between chunks.")
    parser.add_argument("--n_best_size", type=int, default=20,
                        help="The total number of n-best predictions to generate when looking for an answer.")
    parser.add_argument("--null_score_diff_threshold", type=float, default=0.0,
                        help="The threshold used to select the null answer: if the best answer has a score that is "
                             "less than the score of the null answer minus this threshold, the null answer is "
                             "selected for this example. Only useful when `version_2_with_negative=True`.")
    parser.add_argument("--version_2_with_negative", action="store_true",
                        help="If true, some of the examples do not have an answer (SQuAD v2.0).")
    parser.add_argument("--max_answer_length", type=int, default=30,
                        help="The maximum length (in tokens) of an answer that can be generated.")
    parser.add_argument("--max_train_samples", type=int, default=None,
                        help="For debugging purposes or quicker training, truncate the number of training examples "
                             "(and then of training features) to this value if set.")
    parser.add_argument("--max_eval_samples", type=int, default=None,
                        help="For debugging purposes or quicker training, truncate the number of evaluation "
                             "examples to this value if set.")
    parser.add_argument("--max_predict_samples", type=int, default=None,
                        help="For debugging purposes or quicker training, truncate the number of prediction "
                             "examples to this value if set.")
    parser.add_argument("--overwrite_cache", action="store_true",
                        help="Overwrite the cached training and evaluation sets")
    parser.add_argument("--model_type", type=str, default=None, choices=MODEL_TYPES,
                        help="Model type to use if training from scratch.")
    parser.add_argument("--eval_steps", type=int, default=None,
                        help="Also evaluate every this many optimizer steps during training (the original evaluated "
                             "every half epoch); the final evaluation always runs.")
    parser.add_argument("--checkpointing_steps", type=str, default=None,
                        help="Whether the various states should be saved at the end of every n steps, or 'epoch' for "
                             "each epoch.")
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help="If the training should continue from a checkpoint folder (step_N / epoch_N), or "
                             "'latest' for the newest one in --output_dir (none yet: start from scratch).")
    parser.add_argument("--with_tracking", action="store_true",
                        help="Whether to enable experiment trackers for logging.")
    parser.add_argument("--report_to", type=str, default="all",
                        help='The integration to report the results and logs to. Supported platforms are '
                             '`"tensorboard"`, `"wandb"`, `"comet_ml"` and `"clearml"`. Use `"all"` (default) to '
                             "report to all integrations. Only applicable when `--with_tracking` is passed.")
    utils.add_losparse_args(parser)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _trains(args):
    return args.max_train_steps > 0 if args.max_train_steps is not None else args.num_train_epochs > 0


def _check_args(parser, args):
    """Stop with a usage error naming the flag, before anything is loaded."""
    files = {"--train_file": args.train_file, "--validation_file": args.validation_file,
             "--test_file": args.test_file}
    if args.dataset_name is None and not any(files.values()):
        parser.error("need either --dataset_name or --train_file/--validation_file")
    if args.dataset_name is not None and any(files.values()):
        parser.error("pass either --dataset_name or local files (--train_file/--validation_file/--test_file), not both")
    for flag, path in files.items():
        if path is None:
            continue
        if path.rsplit(".", 1)[-1] not in DATA_EXTENSIONS:
            parser.error(f"{flag} should be a {'/'.join(DATA_EXTENSIONS)} file, got {path}")
        if not os.path.isfile(path):
            parser.error(f"{flag} {path} does not exist")
    if args.dataset_name is None:
        if _trains(args) and args.train_file is None:
            parser.error("training needs --train_file (or pass --num_train_epochs 0 to only evaluate)")
        if args.validation_file is None:
            parser.error("--validation_file is required: the script reports EM/F1 on it")
        if args.do_predict and args.test_file is None:
            parser.error("--do_predict needs --test_file")
    if args.dataset_name == "squad_v2" and not args.version_2_with_negative:
        parser.error("--dataset_name squad_v2 has unanswerable questions: add --version_2_with_negative")
    if args.model_name_or_path is None and args.model_type is None:
        parser.error("need --model_name_or_path (or --model_type with --tokenizer_name to train from scratch)")
    if args.model_name_or_path is None and args.tokenizer_name is None:
        parser.error("training from scratch (--model_type) needs --tokenizer_name")

    positive = ["max_seq_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "n_best_size", "max_answer_length", "preprocessing_num_workers"]
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_steps", "max_train_samples", "max_eval_samples", "max_predict_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("num_train_epochs", "num_warmup_steps", "weight_decay"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps < 0:
        parser.error(f"--max_train_steps must be >= 0, got {args.max_train_steps}")
    if not args.learning_rate > 0:
        parser.error(f"--learning_rate must be > 0, got {args.learning_rate}")
    if not 0 <= args.doc_stride < args.max_seq_length:
        parser.error(f"--doc_stride must be in [0, --max_seq_length), got {args.doc_stride} "
                     f"with --max_seq_length {args.max_seq_length}")
    cs = args.checkpointing_steps
    if cs is not None and cs != "epoch" and not (cs.isdigit() and int(cs) > 0):
        parser.error(f"--checkpointing_steps must be a positive integer or 'epoch', got {cs!r}")
    if args.eval_checkpoint is not None:
        if not os.path.exists(args.eval_checkpoint):
            parser.error(f"--eval_checkpoint {args.eval_checkpoint} does not exist")
        if _trains(args):
            parser.error("--eval_checkpoint evaluates a saved checkpoint without training: pass --num_train_epochs 0")
    if args.resume_from_checkpoint is not None:
        if args.resume_from_checkpoint == "latest":
            if args.output_dir is None:
                parser.error("--resume_from_checkpoint latest needs --output_dir")
        elif not os.path.isdir(args.resume_from_checkpoint):
            parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a directory")
        elif not CHECKPOINT_DIR.match(os.path.basename(os.path.normpath(args.resume_from_checkpoint))):
            parser.error("--resume_from_checkpoint must be a step_N or epoch_N folder written by "
                         f"--checkpointing_steps, got {args.resume_from_checkpoint}")
    try:
        utils.validate_losparse_args(args)
    except ValueError as e:
        parser.error(str(e))


def _latest_checkpoint(output_dir):
    """The most recently completed ``step_<n>`` / ``epoch_<i>`` folder in ``output_dir``, or None (incomplete ones,
    from a run stopped while writing them, are skipped with a warning)."""
    return utils.latest_checkpoint(output_dir, CHECKPOINT_DIR.pattern)


def _load_raw_datasets(args):
    """DatasetDict with train / validation / test, from the Hub or from local SQuAD-format files."""
    if args.dataset_name is not None:
        return datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    features = datasets.Features({
        "id": datasets.Value("string"), "title": datasets.Value("string"), "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {"text": datasets.List(datasets.Value("string")),
                    "answer_start": datasets.List(datasets.Value("int32"))},
    })
    splits = {}
    for split, path in (("train", args.train_file), ("validation", args.validation_file), ("test", args.test_file)):
        if path is None:
            continue
        records, has_answers = load_squad_file(path)
        if not records:
            raise utils.RunInputError(f"--{split}_file {path}: no examples (no question in the file)")
        ds = datasets.Dataset.from_list(records, features=features)
        splits[split] = ds if has_answers else ds.remove_columns("answers")
    return datasets.DatasetDict(splits)


def _check_answers(raw_datasets, args):
    """SQuAD v1.1 needs a gold answer for every question; warn about answers that are not in their context."""
    if "validation" not in raw_datasets:
        raise SystemExit(f"run_qa.py: error: no validation split (found {list(raw_datasets)}); EM/F1 are reported on it")
    if "answers" not in raw_datasets["validation"].column_names:
        raise SystemExit("run_qa.py: error: the validation split has no 'answers': EM/F1 need gold answers "
                         "(a file to only predict on goes to --test_file with --do_predict)")
    for split, ds in raw_datasets.items():
        if "answers" not in ds.column_names:
            continue
        answers, contexts = ds["answers"], ds["context"]
        empty = sum(1 for a in answers if len(a["text"]) == 0)
        if empty and not args.version_2_with_negative:
            raise SystemExit(f"run_qa.py: error: the {split} split has {empty} questions without an answer; "
                             "pass --version_2_with_negative for SQuAD v2.0-style data")
        bad = sum(1 for a, c in zip(answers, contexts) for t, s in zip(a["text"], a["answer_start"])
                  if c[s:s + len(t)] != t)
        if bad:
            logger.warning(f"{split}: {bad} answers do not match context[answer_start:answer_start+len(text)]")


def _stack_logits(chunks, num_rows):
    """Concatenate per-batch logits of different widths into one array, padding with -100."""
    width = max(c.shape[1] for c in chunks)
    out = np.full((num_rows, width), -100.0, dtype=np.float32)
    row = 0
    for c in chunks:
        n = min(c.shape[0], num_rows - row)
        out[row:row + n, :c.shape[1]] = c[:n]
        row += n
    return out


def save_prefixed_metrics(results, output_dir, file_name="all_results.json"):
    with open(os.path.join(output_dir, file_name), "w") as f:
        json.dump(results, f, indent=4)


def main():
    args = parse_args()
    # Paths and files first (seconds): a run that cannot read its data or write its results stops before training.
    utils.check_run_paths(args)

    # Initialize the accelerator. We will let the accelerator handle device placement for us in this example.
    # If we're using tracking, we also need to initialize it here and it will by default pick up all supported
    # trackers in the environment.
    accelerator_log_kwargs = {}
    if args.with_tracking:
        accelerator_log_kwargs["log_with"] = args.report_to
        accelerator_log_kwargs["project_dir"] = args.output_dir
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, **accelerator_log_kwargs)

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
            raise SystemExit(f"run_qa.py: error: {e}")

    # If passed along, set the training seed now.
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process and args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    # Get the datasets: the Hub's squad / squad_v2, or local SQuAD-format files (see utils_qa.load_squad_file).
    raw_datasets = _load_raw_datasets(args)
    _check_answers(raw_datasets, args)

    # Load pretrained model and tokenizer
    if args.config_name:
        config = AutoConfig.from_pretrained(args.config_name, trust_remote_code=args.trust_remote_code)
    elif args.model_name_or_path:
        config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    else:
        config = CONFIG_MAPPING[args.model_type]()
        logger.warning("You are instantiating a new config instance from scratch.")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path, use_fast=True,
                                              trust_remote_code=args.trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise SystemExit("run_qa.py: error: question answering needs a fast tokenizer (character offsets); "
                         f"{type(tokenizer).__name__} is not one")
    if args.model_name_or_path:
        model = AutoModelForQuestionAnswering.from_pretrained(args.model_name_or_path, config=config,
                                                              trust_remote_code=args.trust_remote_code)
    else:
        logger.info("Training new model from scratch")
        model = AutoModelForQuestionAnswering.from_config(config, trust_remote_code=args.trust_remote_code)

    # ===== STEP 1: Replace Matrices =====
    # Substitute weights with low rank matrix and sparse matrix. A checkpoint to evaluate fixes the weights (and
    # its ranks), so the SVD is skipped then.
    if not args.no_losparse:
        utils.substitute_layer_weights(module=model,
                                       allow_name=ALLOW_NAME,
                                       block_name=BLOCK_NAME,
                                       parameter_ratio=args.low_rank_parameter_ratio,
                                       do_svd=args.eval_checkpoint is None,
                                       svd=args.svd)
    if args.eval_checkpoint is not None:
        utils.load_checkpoint(model, args.eval_checkpoint)
        logger.info(f"Loaded checkpoint {args.eval_checkpoint}")

    # Preprocessing the datasets.
    if args.max_seq_length > tokenizer.model_max_length:
        logger.warning(f"The max_seq_length passed ({args.max_seq_length}) is larger than the maximum length for the "
                       f"model ({tokenizer.model_max_length}). Using max_seq_length={tokenizer.model_max_length}.")
    max_seq_length = min(args.max_seq_length, tokenizer.model_max_length)
    doc_stride = min(args.doc_stride, max_seq_length - 1)
    if max_seq_length - tokenizer.num_special_tokens_to_add(pair=True) - doc_stride - 1 < 1:
        raise SystemExit(f"run_qa.py: error: --max_seq_length {max_seq_length} leaves no room for a question next to "
                         f"--doc_stride {doc_stride} context tokens")
    feature_kwargs = {"tokenizer": tokenizer, "max_seq_length": max_seq_length, "doc_stride": doc_stride,
                      "pad_to_max_length": args.pad_to_max_length}
    map_kwargs = {"batched": True, "load_from_cache_file": not args.overwrite_cache,
                  "num_proc": args.preprocessing_num_workers if args.preprocessing_num_workers > 1 else None}

    do_train = _trains(args)
    if do_train:
        if "train" not in raw_datasets:
            raise SystemExit("run_qa.py: error: training needs a train split")
        train_examples = raw_datasets["train"]
        if args.max_train_samples is not None:
            # We will select sample from whole data if argument is specified
            train_examples = train_examples.select(range(min(args.max_train_samples, len(train_examples))))
        with accelerator.main_process_first():
            train_dataset = train_examples.map(functools.partial(prepare_train_features, **feature_kwargs),
                                               remove_columns=train_examples.column_names,
                                               desc="Running tokenizer on train dataset", **map_kwargs)
        if args.max_train_samples is not None:
            # Number of samples might increase during Feature Creation, We select only specified max samples
            train_dataset = train_dataset.select(range(min(args.max_train_samples, len(train_dataset))))

    def features_for(examples, desc):
        with accelerator.main_process_first():
            return examples.map(functools.partial(prepare_validation_features, **feature_kwargs),
                                remove_columns=examples.column_names, desc=desc, **map_kwargs)

    eval_examples = raw_datasets["validation"]
    if args.max_eval_samples is not None:
        # Whole examples are selected, so that none loses some of its windows.
        eval_examples = eval_examples.select(range(min(args.max_eval_samples, len(eval_examples))))
    eval_dataset = features_for(eval_examples, "Running tokenizer on validation dataset")
    if args.do_predict:
        if "test" not in raw_datasets:
            raise SystemExit("run_qa.py: error: --do_predict requires a test split")
        predict_examples = raw_datasets["test"]
        if args.max_predict_samples is not None:
            predict_examples = predict_examples.select(range(min(args.max_predict_samples, len(predict_examples))))
        predict_dataset = features_for(predict_examples, "Running tokenizer on prediction dataset")

    # DataLoaders creation:
    if args.pad_to_max_length:
        # If padding was already done to max length, we use the default data collator that will just convert
        # everything to tensors.
        data_collator = default_data_collator
    else:
        # Otherwise, `DataCollatorWithPadding` will apply dynamic padding for us (by padding to the maximum length of
        # the samples passed). Under mixed precision, pad to a multiple of 8 for the tensor cores.
        data_collator = DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=(8 if accelerator.mixed_precision in ("fp16", "bf16", "fp8") else None))
    eval_dataloader = DataLoader(eval_dataset.remove_columns(["example_id", "offset_mapping"]),
                                 collate_fn=data_collator, batch_size=args.per_device_eval_batch_size)
    if args.do_predict:
        predict_dataloader = DataLoader(predict_dataset.remove_columns(["example_id", "offset_mapping"]),
                                        collate_fn=data_collator, batch_size=args.per_device_eval_batch_size)

    fsdp2 = args.fsdp2 or getattr(accelerator, "is_fsdp2", False)  # bigger than one GPU: ranks hold whole rows
    if fsdp2:
        model = utils.apply_fsdp2(model, accelerator)
    if not do_train:
        model, eval_dataloader = accelerator.prepare(model, eval_dataloader)
        train_dataloader = None
        args.max_train_steps = 0
    else:
        # The shuffling order of epoch e depends only on (seed, e): a resumed run sees the same batches.
        train_generator = torch.Generator()
        shuffle_seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=data_collator,
                                      batch_size=args.per_device_train_batch_size, generator=train_generator)

        # Optimizer. Split weights in two groups, one with weight decay and the other not.
        no_decay = ["bias", "LayerNorm.weight"]
        optimizer_grouped_parameters = [
            {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
             "weight_decay": args.weight_decay},
            {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)],
             "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(optimizer_grouped_parameters, lr=args.learning_rate)

        # Prepare everything with our `accelerator`; the schedule is sized on the prepared (sharded) dataloader.
        model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
            model, optimizer, train_dataloader, eval_dataloader)
        if fsdp2:  # FSDP2: save_state writes full, 1-process files
            utils.fsdp2_checkpointing(accelerator, model, optimizer)
        num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
        # Afterwards we recalculate our number of training epochs
        args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
        lr_scheduler = get_scheduler(name=args.lr_scheduler_type, optimizer=optimizer,
                                     num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                                     num_training_steps=args.max_train_steps * accelerator.num_processes)
        lr_scheduler = accelerator.prepare(lr_scheduler)
    if args.do_predict:
        predict_dataloader = accelerator.prepare(predict_dataloader)

    if do_train and not args.no_losparse:
        try:
            utils.validate_losparse_args(args, total_step=args.max_train_steps)
        except ValueError as e:
            raise SystemExit(f"run_qa.py: error: {e}")

    # Figure out how many steps we should save the Accelerator states
    checkpointing_steps = args.checkpointing_steps
    if checkpointing_steps is not None and checkpointing_steps.isdigit():
        checkpointing_steps = int(checkpointing_steps)

    # We need to initialize the trackers we use, and also store our configuration.
    # The trackers initializes automatically on the main process.
    if args.with_tracking:
        experiment_config = {k: (v.value if isinstance(v, SchedulerType) else v) for k, v in vars(args).items()}
        accelerator.init_trackers("qa_no_trainer", experiment_config)

    references = references_from_examples(eval_examples) if "answers" in eval_examples.column_names else None

    def evaluate(dataloader, examples, features, refs, output_dir=None, prefix=None):
        """Logits of every window -> answers -> official SQuAD metric (None without gold answers)."""
        model.eval()
        all_start_logits, all_end_logits = [], []
        for batch in dataloader:
            with torch.no_grad():
                outputs = model(**batch)
            start_logits, end_logits = outputs.start_logits, outputs.end_logits
            if not args.pad_to_max_length:  # necessary to pad predictions and labels for being gathered
                start_logits = accelerator.pad_across_processes(start_logits, dim=1, pad_index=-100)
                end_logits = accelerator.pad_across_processes(end_logits, dim=1, pad_index=-100)
            all_start_logits.append(accelerator.gather_for_metrics(start_logits).float().cpu().numpy())
            all_end_logits.append(accelerator.gather_for_metrics(end_logits).float().cpu().numpy())
        logits = (_stack_logits(all_start_logits, len(features)), _stack_logits(all_end_logits, len(features)))
        predictions = postprocess_qa_predictions(
            examples=examples, features=features, predictions=logits,
            version_2_with_negative=args.version_2_with_negative, n_best_size=args.n_best_size,
            max_answer_length=args.max_answer_length, null_score_diff_threshold=args.null_score_diff_threshold,
            output_dir=output_dir if accelerator.is_main_process else None, prefix=prefix)
        if refs is None:
            return None
        return squad_evaluate(predictions, refs, version_2_with_negative=args.version_2_with_negative)

    def log_eval(metric, step, threshold):
        report = utils.compression_report(model)
        summary = ", ".join(f"{k} {v:.2f}" for k, v in metric.items() if not k.endswith("total") and k != "exact")
        logger.info(f"step {step}: {summary} | threshold {threshold} | effective ratio {report.effective_ratio:.4f}")
        return report

    # ===== STEP 2: Setup Pruner =====
    pruner = None
    threshold = None
    if do_train and not args.no_losparse:
        pruner = utils.Pruner(model=model,
                              args=args,
                              total_step=args.max_train_steps,
                              mask_param_name=["sparse"],
                              pruner_name=args.pruner_name,
                              structured_method=args.structured_method,
                              structured_direction=args.structured_direction)
        # save_state / load_state carry the importance scores, so a resumed run prunes as an uninterrupted one.
        accelerator.register_for_checkpointing(pruner)
        threshold = args.initial_threshold

    completed_steps = 0
    train_runtime = 0.0
    if do_train:
        total_batch_size = (args.per_device_train_batch_size * accelerator.num_processes
                            * args.gradient_accumulation_steps)
        logger.info("***** Running training *****")
        logger.info(f"  Num examples = {len(train_dataset)}")
        logger.info(f"  Num Epochs = {args.num_train_epochs}")
        logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size}")
        logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
        logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
        logger.info(f"  Total optimization steps = {args.max_train_steps}")

        # Only show the progress bar once on each machine.
        progress_bar = tqdm(range(args.max_train_steps), disable=not accelerator.is_local_main_process)
        starting_epoch = 0
        resume_step = None

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
            # Extract `epoch_{i}` or `step_{i}`
            kind, number = CHECKPOINT_DIR.match(os.path.basename(os.path.normpath(checkpoint_path))).groups()
            if kind == "epoch":
                starting_epoch = int(number) + 1
                completed_steps = starting_epoch * num_update_steps_per_epoch
            else:
                # need to multiply `gradient_accumulation_steps` to reflect real steps
                resume_step = int(number) * args.gradient_accumulation_steps
                starting_epoch = resume_step // len(train_dataloader)
                completed_steps = resume_step // args.gradient_accumulation_steps
                resume_step -= starting_epoch * len(train_dataloader)
            if pruner is not None:
                threshold, _ = pruner.schedule_threshold_comb(max(completed_steps - 1, 0))

        # update the progress_bar if load from checkpoint
        progress_bar.update(completed_steps)
        start_time, eval_time = time.perf_counter(), 0.0
        for epoch in range(starting_epoch, args.num_train_epochs):
            model.train()
            train_generator.manual_seed(shuffle_seed + epoch)
            if args.with_tracking:
                total_loss, num_batches = 0.0, 0
            if epoch == starting_epoch and resume_step is not None:
                # We skip the first `n` batches in the dataloader when resuming from a checkpoint
                active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_step)
            else:
                active_dataloader = train_dataloader
            for batch in active_dataloader:
                with accelerator.accumulate(model):
                    outputs = model(**batch)
                    loss = outputs.loss
                    # We keep track of the loss at each epoch
                    if args.with_tracking:
                        total_loss += loss.detach().float()
                        num_batches += 1
                    accelerator.backward(loss)
                    optimizer.step()

                    # ===== STEP 3: Prune During Training =====
                    # After the optimizer step, once per optimizer step, with the number of steps done before it.
                    if pruner is not None and accelerator.sync_gradients:
                        threshold, mask_threshold = pruner.update_and_pruning(model, completed_steps)

                    lr_scheduler.step()
                    optimizer.zero_grad()

                # Checks if the accelerator has performed an optimization step behind the scenes
                if not accelerator.sync_gradients:
                    continue
                progress_bar.update(1)
                completed_steps += 1
                if threshold is not None:
                    progress_bar.set_postfix(threshold=f"{threshold:.3f}", refresh=False)

                if isinstance(checkpointing_steps, int) and completed_steps % checkpointing_steps == 0:
                    output_dir = f"step_{completed_steps}"
                    if args.output_dir is not None:
                        output_dir = os.path.join(args.output_dir, output_dir)
                    utils.save_state_atomic(accelerator, output_dir)

                if args.eval_steps and completed_steps % args.eval_steps == 0 and \
                        completed_steps < args.max_train_steps:
                    eval_start = time.perf_counter()
                    metric = evaluate(eval_dataloader, eval_examples, eval_dataset, references)
                    report = log_eval(metric, completed_steps, threshold)
                    if args.with_tracking:
                        accelerator.log({**{f"eval_{k}": v for k, v in metric.items()},
                                         "threshold": threshold, "effective_ratio": report.effective_ratio},
                                        step=completed_steps)
                    model.train()
                    eval_time += time.perf_counter() - eval_start

                if completed_steps >= args.max_train_steps:
                    break

            if args.with_tracking and num_batches:
                accelerator.log({"train_loss": float(total_loss) / num_batches, "epoch": epoch}, step=completed_steps)
            if args.checkpointing_steps == "epoch":
                output_dir = f"epoch_{epoch}"
                if args.output_dir is not None:
                    output_dir = os.path.join(args.output_dir, output_dir)
                utils.save_state_atomic(accelerator, output_dir)
            if completed_steps >= args.max_train_steps:
                break
        train_runtime = time.perf_counter() - start_time - eval_time  # without the evaluations in between
        progress_bar.close()

    # Evaluation
    logger.info("***** Running Evaluation *****")
    logger.info(f"  Num examples = {len(eval_examples)} ({len(eval_dataset)} features)")
    logger.info(f"  Batch size = {args.per_device_eval_batch_size}")
    eval_metric = evaluate(eval_dataloader, eval_examples, eval_dataset, references, output_dir=args.output_dir)
    report = log_eval(eval_metric, completed_steps, threshold)

    # Prediction
    predict_metric = None
    if args.do_predict:
        logger.info("***** Running Prediction *****")
        logger.info(f"  Num examples = {len(predict_examples)} ({len(predict_dataset)} features)")
        predict_refs = references_from_examples(predict_examples) if "answers" in predict_examples.column_names \
            else None
        predict_metric = evaluate(predict_dataloader, predict_examples, predict_dataset, predict_refs,
                                  output_dir=args.output_dir, prefix="predict")
        if predict_metric is not None:
            logger.info(f"Predict metrics: {predict_metric}")

    accelerator.print(report.table())
    results = {f"eval_{k}": v for k, v in eval_metric.items()}
    if predict_metric is not None:
        results.update({f"predict_{k}": v for k, v in predict_metric.items()})
    results.update({"effective_ratio": report.effective_ratio, "model_params": report.model_params,
                    "model_params_dense_equivalent": report.model_params_dense_equivalent,
                    "train_runtime_s": round(train_runtime, 3), "train_steps": completed_steps,
                    "threshold": threshold, "eval_samples": len(eval_examples)})
    logger.info(json.dumps(results, indent=4))
    if args.with_tracking:
        accelerator.log({**{f"eval_{k}": v for k, v in eval_metric.items()}, "threshold": threshold,
                         "effective_ratio": report.effective_ratio}, step=completed_steps)
        accelerator.end_training()

    if args.output_dir is not None:
        accelerator.wait_for_everyone()
        unwrapped_model = accelerator.unwrap_model(model)
        if fsdp2:  # FSDP2: gather the full weights
            unwrapped_model = utils.fsdp2_full_model(unwrapped_model)
        if args.eval_checkpoint is None:
            unwrapped_model.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                                            save_function=accelerator.save)
        if accelerator.is_main_process:
            if args.eval_checkpoint is None:
                tokenizer.save_pretrained(args.output_dir)
                # The original key layout (left/right/sparse), what --eval_checkpoint loads.
                utils.save_checkpoint(unwrapped_model, os.path.join(args.output_dir, "pytorch_model.bin"))
                if not args.no_losparse:  # only L, R and the kept rows of S (utils.load_compact)
                    utils.export_compact(unwrapped_model, os.path.join(args.output_dir, "compact"),
                                         tokenizer=tokenizer, losparse_args=args)
            save_prefixed_metrics(results, args.output_dir)


if __name__ == "__main__":
    with utils.one_line_errors("run_qa.py"):
        main()
