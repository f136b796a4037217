"""Tiny models and helpers shared by the tests of the core library (test_decomposition, test_substitute, test_compact,
test_checkpoint, test_export, test_pruner, test_cli)."""
import argparse

import torch
from torch import nn

import utils

ORIG_ALLOW = ["query", "key", "value", "q_proj", "k_proj", "v_proj", "out_proj", "dense", "attention", "fc1", "fc2"]
SCRIPT_ALLOW = ORIG_ALLOW + ["query_proj", "key_proj", "value_proj"]
BLOCK = ["pooler", "classifier", "LayerNorm", "embeddings"]


class MLP(nn.Module):
    """A LLaMA-style bias-less MLP block."""

    def __init__(self, d=24, h=40):
        super().__init__()
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)
        self.dense = nn.Linear(d, d, bias=True)

    def forward(self, x):
        return self.dense(self.down_proj(torch.relu(self.up_proj(x))))


def batch_inputs(kind, batch=2, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits_of(model, kind, **kw):
    with torch.no_grad():
        return model(**batch_inputs(kind, **kw)).logits


def losparse_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, utils.LinearLoSparse)}


def zero_random_rows(model, frac=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in losparse_layers(model).values():
            rows = torch.rand(layer.out_feature, generator=g) < frac
            layer.sparse.weight[rows] = 0


FORM_CASES = [("speed", None), ("memory", None)] + [("speed", p) for p in utils.COMPACT_PATHS]


def set_form(model, prefer, path):
    for m in losparse_layers(model).values():
        m.prefer, m.compact_path = prefer, path


def zero_rows_and_cols(model, frac=0.5, seed=0):
    """Zero rows of S (columns for every third layer), as row- or column-structured pruning leaves it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(losparse_layers(model).values()):
            if i % 3 == 1:
                layer.sparse.weight[:, torch.rand(layer.in_feature, generator=g) < frac] = 0
            else:
                layer.sparse.weight[torch.rand(layer.out_feature, generator=g) < frac] = 0


def schedule_args(**kw):
    base = dict(beta1=0.85, beta2=1.0, deltaT=2, initial_threshold=1.0, final_threshold=0.3, initial_warmup=1,
                final_warmup=2, warmup_steps=3, low_rank_parameter_ratio=0.1)
    base.update(kw)
    return argparse.Namespace(**base)


class QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(12, 10)
        self.dense = nn.Linear(10, 16)
        self.output = nn.Linear(16, 12)
