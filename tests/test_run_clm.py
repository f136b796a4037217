"""run_clm.py and decoder LLM families on CPU, offline: tiny LLaMA / Mistral / Qwen2 / Qwen3 / Gemma / OPT / GPT-NeoX.

In process: the exact STEP 1 module names of each family (GQA shapes, Qwen2's q/k/v biases, lm_head and embeddings
untouched), the substituted model's output equals the dense one, a short pruning run ends at low-rank + final
threshold within one row per layer, GPT-2's Conv1D is refused; compacted greedy generation with the KV cache equals
the uncompacted model's (utils.prune and utils.load_compact). End to end (subprocesses): perplexity checked by hand,
a LoSparse run, eval-only from its checkpoint, exact resume, usage errors.
"""
import json
import math
import random

import pytest
import torch
from torch import nn

from conftest import REPO, VOCAB, make_tokenizer, run_script

import run_clm
import utils

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
V = len(dict.fromkeys(VOCAB))
LLAMA_NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]


def family_config(family):
    """A tiny config of a family: hidden 32-48, 2 layers, grouped-query attention where the family has it."""
    import transformers as T

    common = dict(vocab_size=V, num_hidden_layers=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                  eos_token_id=3)
    gqa = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    if family == "llama":
        return T.LlamaConfig(**common, **gqa)
    if family == "mistral":
        return T.MistralConfig(**common, **gqa, sliding_window=None)
    if family == "qwen2":
        return T.Qwen2Config(**common, **gqa)
    if family == "qwen3":
        return T.Qwen3Config(**common, **gqa, head_dim=8)
    if family == "gemma":
        return T.GemmaConfig(**common, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=8)
    if family == "opt":
        return T.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=2,
                           eos_token_id=3)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                               eos_token_id=3)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=2,
                            eos_token_id=3)
    raise ValueError(family)


def build(family, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_config(family)).eval()


# family -> (prefix of layer i, names under it, {name: (out, in)} shapes of layer 0, names with a bias)
FAMILIES = {
    "llama": ("model.layers.{}.", LLAMA_NAMES, {"self_attn.k_proj": (16, 32), "mlp.down_proj": (32, 64)}, []),
    "mistral": ("model.layers.{}.", LLAMA_NAMES, {"self_attn.v_proj": (16, 32)}, []),
    "qwen2": ("model.layers.{}.", LLAMA_NAMES, {"self_attn.k_proj": (16, 32)},
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    "qwen3": ("model.layers.{}.", LLAMA_NAMES, {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32)}, []),
    "gemma": ("model.layers.{}.", LLAMA_NAMES, {"self_attn.k_proj": (8, 32), "mlp.gate_proj": (64, 32)}, []),
    "opt": ("model.decoder.layers.{}.", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.out_proj", "fc1", "fc2"], {"fc1": (64, 32)},
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]),
    "gpt_neox": ("gpt_neox.layers.{}.", ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                         "mlp.dense_4h_to_h"], {"attention.query_key_value": (144, 48)},
                 ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_step1_names_shapes_and_output(family):
    model = build(family)
    allow, block = run_clm.losparse_lists(model.config)
    assert "lm_head" in block
    ids = torch.randint(4, V, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    emb = model.get_input_embeddings().weight
    replaced = utils.substitute_layer_weights(model, allow, block, parameter_ratio=0.2, svd="full")
    prefix, names, shapes, biased = FAMILIES[family]
    expected = {prefix.format(i) + n for i in range(2) for n in names}
    assert {r["name"] for r in replaced} == expected
    for name, (out, inp) in shapes.items():
        layer = model.get_submodule(prefix.format(0) + name)
        assert isinstance(layer, utils.LinearLoSparse) and (layer.out_feature, layer.in_feature) == (out, inp)
    for n in names:
        assert model.get_submodule(prefix.format(1) + n).has_bias == (n in biased), n
    # lm_head and the embeddings stay as they were (tied where the family ties them)
    assert type(model.get_output_embeddings()) is nn.Linear
    assert model.get_input_embeddings().weight is emb
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is emb
    # L R + S = W: the substituted model computes the dense model's logits
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "opt", "gpt_neox"])
def test_family_short_pruning_run_reaches_the_ratio(family):
    """A few optimizer steps with the Pruner: kept S = final threshold within one row per layer."""
    import argparse

    model = build(family).train()
    allow, block = run_clm.losparse_lists(model.config)
    utils.substitute_layer_weights(model, allow, block, parameter_ratio=0.1, svd="full")
    args = utils.add_losparse_args(argparse.ArgumentParser()).parse_args(
        ["--final_threshold", "0.25", "--warmup_steps", "2", "--initial_warmup", "1", "--final_warmup", "2",
         "--deltaT", "2"])
    steps = 12
    pruner = utils.Pruner(model, args, total_step=steps, mask_param_name=["sparse"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        ids = torch.randint(4, V, (4, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        threshold, _ = pruner.update_and_pruning(model, step)
        opt.zero_grad()
    rep = utils.compression_report(model)
    one_row_per_layer = sum(l["in_features"] for l in rep.layers)
    assert threshold == pytest.approx(0.25)
    assert rep.sparse_params == pytest.approx(0.25 * rep.dense_params, abs=one_row_per_layer)
    assert rep.effective_ratio == pytest.approx((rep.low_rank_params + rep.sparse_params) / rep.dense_params)


def test_gpt2_conv1d_is_refused_with_a_message():
    model = build("gpt2")
    with pytest.raises(ValueError, match="Conv1D"):
        run_clm.losparse_lists(model.config)
    with pytest.raises(TypeError, match=r"transformer\.h\.0\.attn\.c_attn is a transformers Conv1D"):
        utils.substitute_layer_weights(model, ["c_attn", "c_proj", "c_fc"], ["wte", "wpe"])


def test_unknown_family_needs_allow_name():
    from transformers import PretrainedConfig

    cfg = PretrainedConfig()
    cfg.model_type = "mamba"
    with pytest.raises(ValueError, match="--allow_name"):
        run_clm.losparse_lists(cfg)
    assert run_clm.losparse_lists(cfg, ["in_proj"])[0] == ["in_proj"]


# ----------------------------------------------------------------------------------------------------
# Generation with a compacted model
# ----------------------------------------------------------------------------------------------------
# Every compact form is run: the cost model's choice under both ``prefer`` values, and each form forced.
FORM_CASES = [("speed", None), ("memory", None)] + [("speed", p) for p in utils.COMPACT_PATHS]


@pytest.fixture(scope="module")
def generation_models(tmp_path_factory):
    """A LoSparse LLaMA as pruning leaves it (rows or columns of S zeroed), its greedy continuation, its
    compacted self and its export reloaded."""
    from transformers import AutoModelForCausalLM

    model = build("llama", seed=3)
    utils.substitute_layer_weights(model, *run_clm.losparse_lists(model.config), parameter_ratio=0.1)
    # What pruning leaves: about 70 % of the rows (or, every third layer, of the columns) of each S are zero,
    # some layers keep none.
    g = torch.Generator().manual_seed(0)
    for i, m in enumerate(l for l in model.modules() if isinstance(l, utils.LinearLoSparse)):
        if i % 3 == 1:
            keep = torch.rand(m.in_feature, generator=g) < 0.3
            m.sparse.weight.data[:, ~keep] = 0
        else:
            keep = torch.rand(m.out_feature, generator=g) < (0.0 if i == 3 else 0.3)
            m.sparse.weight.data[~keep] = 0
    prompt = torch.tensor([[2, 40, 51, 62, 73, 84], [2, 90, 91, 92, 93, 94]])
    gen = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(input_ids=prompt, **gen)
        ref_logits = model(input_ids=reference).logits
    out = tmp_path_factory.mktemp("gen") / "compact"
    utils.export_compact(model, out)
    utils.prune(model)
    loaded = utils.load_compact(out, AutoModelForCausalLM)
    return model, loaded, prompt, gen, reference, ref_logits


def test_compacted_model_holds_both_forms_and_fewer_parameters(generation_models):
    model, loaded, *_ = generation_models
    for m in (model, loaded):
        layers = [l for l in m.modules() if isinstance(l, utils.LinearLoSparse)]
        assert all(l.is_compacted for l in layers if l.has_sparse)
        assert any(l.sparse_weight_pruned_cols is not None for l in layers)
        assert any(l.sparse_weight_pruned is not None and l.nonzero_idx.numel() for l in layers)
    assert utils.compression_report(loaded).model_params < utils.compression_report(build("llama")).model_params


@pytest.mark.parametrize("prefer,path", FORM_CASES)
def test_compacted_greedy_generation_equals_uncompacted(generation_models, prefer, path):
    model, loaded, prompt, gen, reference, ref_logits = generation_models
    for small in (model, loaded):
        for m in small.modules():
            if isinstance(m, utils.LinearLoSparse):
                m.prefer, m.compact_path = prefer, path
        with torch.no_grad():
            out = small.generate(input_ids=prompt, **gen)
            torch.testing.assert_close(small(input_ids=reference).logits, ref_logits, atol=1e-5, rtol=1e-5)
        assert out.shape == (2, 6 + 12)
        assert torch.equal(out, reference)
        taken = {m.last_path for m in small.modules() if isinstance(m, utils.LinearLoSparse) and m.is_compacted}
        assert taken == ({path} if path else taken) and (prefer == "speed" or "merged" not in taken)
    assert len(set(reference[0, 6:].tolist())) > 1  # not a constant continuation


# ----------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------
WORDS = "the cat sat on the mat a dog ran in the city paris is the capital of france he she said today".split()
BLOCK = 24
LOSPARSE = ["--low_rank_parameter_ratio", 0.1, "--final_threshold", 0.2, "--warmup_steps", 3, "--initial_warmup", 1,
            "--final_warmup", 2, "--deltaT", 2]
STEPS = 20


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("clm")
    for family in ("llama", "qwen2"):
        build(family, seed=0).save_pretrained(root / family)
        make_tokenizer().save_pretrained(root / family)
    rng = random.Random(0)
    for name, n in (("train", 160), ("validation", 40)):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(n)]
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
        with open(root / f"{name}.jsonl", "w") as f:
            for line in lines:
                f.write(json.dumps({"id": len(line), "body": line}) + "\n")
    return {"root": root, "env": dict(ENV, HF_DATASETS_CACHE=str(root / "hf_datasets"))}


def _run(assets, args):
    return run_script("run_clm.py", args, extra_env=assets["env"])


def _check_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def _results(out):
    return json.loads((out / "all_results.json").read_text())


def _blocks(tokenizer, lines, block):
    """The evaluation blocks built by hand: every line tokenized, concatenated, cut in blocks (remainder dropped)."""
    ids = [t for line in lines for t in tokenizer(line)["input_ids"]]
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


def test_perplexity_is_exp_of_the_mean_token_loss(assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = assets["root"]
    out = root / "eval-dense"
    # batch 4: the last batch is smaller, so a mean of batch means would differ from the token mean
    proc = _run(assets, ["--model_name_or_path", root / "llama", "--validation_file", root / "validation.jsonl",
                         "--text_column", "body", "--block_size", BLOCK, "--per_device_eval_batch_size", 4,
                         "--num_train_epochs", 0, "--no_losparse", "--output_dir", out])
    _check_ok(proc)
    res = _results(out)
    lines = [json.loads(l)["body"] for l in (root / "validation.jsonl").read_text().splitlines()]
    blocks = _blocks(AutoTokenizer.from_pretrained(root / "llama"), lines, BLOCK)
    assert len(blocks) % 4 != 0 and res["eval_blocks"] == len(blocks) and res["block_size"] == BLOCK
    model = AutoModelForCausalLM.from_pretrained(root / "llama").eval()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), blocks[:, 1:].reshape(-1),
                                               reduction="none").double()
    assert res["eval_tokens"] == losses.numel() == len(blocks) * (BLOCK - 1)
    assert res["eval_loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(float(losses.mean())), rel=1e-5)
    batch_means = losses.view(len(blocks), -1).split(4)
    assert abs(float(torch.stack([b.mean() for b in batch_means]).mean()) - float(losses.mean())) > 1e-4
    assert res["train_steps"] == 0 and res["effective_ratio"] == 1.0
    assert not (out / "model.safetensors").exists()
    assert run_clm.perplexity_of(float(losses.sum()), losses.numel()) == (math.exp(float(losses.mean())),
                                                                           float(losses.sum()) / losses.numel())
    assert run_clm.perplexity_of(1e6, 10)[0] == float("inf")


@pytest.fixture(scope="module")
def trained(assets):
    root = assets["root"]
    out = root / "run-qwen2"
    proc = _run(assets, ["--model_name_or_path", root / "qwen2", "--train_file", root / "train.txt",
                         "--validation_file", root / "validation.txt", "--block_size", BLOCK,
                         "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 8,
                         "--max_train_steps", STEPS, "--learning_rate", 3e-3, "--seed", 5, "--checkpointing_steps", 7,
                         *LOSPARSE, "--output_dir", out])
    _check_ok(proc)
    return out, proc


def test_losparse_run_ratio_files_and_perplexity_lines(trained):
    out, proc = trained
    for f in ("config.json", "model.safetensors", "tokenizer_config.json", "pytorch_model.bin", "all_results.json",
              "compact/losparse_model.safetensors", "compact/losparse_config.json"):
        assert (out / f).is_file(), f
    # compact/ loads with plain transformers (trust_remote_code; tests/test_remote_code.py loads such folders)
    cfg = json.loads((out / "compact" / "config.json").read_text())
    assert cfg["model_type"] == "losparse" and cfg["base_architecture"] == "Qwen2ForCausalLM"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_losparse.LoSparseForCausalLM"
    assert {"modeling_losparse.py", "generation_config.json", "tokenizer_config.json"} <= set(
        p.name for p in (out / "compact").iterdir())
    assert "run_clm.py" in (out / "compact" / "README.md").read_text()
    res = _results(out)
    assert res["train_steps"] == STEPS and math.isfinite(res["perplexity"]) and res["perplexity"] > 1
    assert res["perplexity"] == pytest.approx(math.exp(res["eval_loss"]))
    sd = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    lefts = sorted(k for k in sd if k.endswith(".left.weight"))
    assert len(lefts) == 14 and "model.layers.0.self_attn.q_proj.bias" in sd  # Qwen2's q/k/v biases
    dense = low = rows = one_row = 0
    for k in lefts:
        p = k[: -len("left.weight")]
        out_f, r = sd[k].shape
        in_f = sd[p + "right.weight"].shape[1]
        dense += out_f * in_f
        low += r * (out_f + in_f)
        rows += int((sd[p + "sparse.weight"] != 0).any(dim=1).sum()) * in_f
        one_row += in_f
    assert res["effective_ratio"] == pytest.approx((low + rows) / dense, abs=1e-12)
    assert abs(rows - 0.2 * dense) <= one_row  # the final threshold, within one row per layer
    assert res["model_params"] < res["dense_equivalent_params"]
    assert "perplexity:" in proc.stderr and "threshold 0.2000" in proc.stderr


def test_eval_checkpoint_reproduces_the_perplexity(assets, trained):
    root = assets["root"]
    out, _ = trained
    ev = root / "eval-ckpt"
    proc = _run(assets, ["--model_name_or_path", root / "qwen2", "--validation_file", root / "validation.txt",
                         "--block_size", BLOCK, "--per_device_eval_batch_size", 5, "--num_train_epochs", 0,
                         "--eval_checkpoint", out / "pytorch_model.bin", "--output_dir", ev])
    _check_ok(proc)
    a, b = _results(out), _results(ev)
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6)
    assert (b["effective_ratio"], b["model_params"], b["eval_tokens"]) == \
        (a["effective_ratio"], a["model_params"], a["eval_tokens"])
    assert b["train_steps"] == 0
    # the compact export reloads without the dense model and gives the same perplexity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    small = utils.load_compact(out / "compact", AutoModelForCausalLM)
    tok = AutoTokenizer.from_pretrained(out / "compact")
    blocks = _blocks(tok, (root / "validation.txt").read_text().splitlines(), BLOCK)
    with torch.no_grad():
        sums, counts = run_clm.token_losses(small(input_ids=blocks).logits, blocks)
    assert run_clm.perplexity_of(float(sums.double().sum()), int(counts.sum()))[0] == pytest.approx(a["perplexity"],
                                                                                                      rel=1e-5)


def test_resume_is_exact(assets, trained):
    root = assets["root"]
    full, _ = trained
    resumed = root / "resumed"
    assert (full / "step_14" / "custom_checkpoint_1.pkl").is_file()  # the Pruner's state
    proc = _run(assets, ["--model_name_or_path", root / "qwen2", "--train_file", root / "train.txt",
                         "--validation_file", root / "validation.txt", "--block_size", BLOCK,
                         "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 8,
                         "--max_train_steps", STEPS, "--learning_rate", 3e-3, "--seed", 6, *LOSPARSE,
                         "--resume_from_checkpoint", full / "step_14", "--output_dir", resumed])
    _check_ok(proc)
    assert "Resumed from checkpoint" in proc.stdout
    a = torch.load(full / "pytorch_model.bin", map_location="cpu", weights_only=True)
    b = torch.load(resumed / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
    ra, rb = _results(full), _results(resumed)
    assert (rb["perplexity"], rb["effective_ratio"], rb["train_steps"]) == \
        (ra["perplexity"], ra["effective_ratio"], ra["train_steps"])


# ----------------------------------------------------------------------------------------------------
# --init calibrated --one_shot, then training: the allocated budget holds at every step; an exact resume
# ----------------------------------------------------------------------------------------------------
# budget 0.3 + 0.2 of the replaced matrices; 2 warm-up steps that do not mask, PLATON every 2nd step, then every step
ONE_SHOT = ["--init", "calibrated", "--one_shot", "--calibration_samples", 4, "--low_rank_parameter_ratio", 0.3,
            "--final_threshold", 0.2, "--warmup_steps", 2, "--initial_warmup", 1, "--final_warmup", 1, "--deltaT", 2]
ONE_SHOT_STEPS = 6


def _one_shot_run(assets, out, *extra):
    root = assets["root"]
    return _run(assets, ["--model_name_or_path", root / "llama", "--train_file", root / "train.txt",
                         "--validation_file", root / "validation.txt", "--block_size", BLOCK,
                         "--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 8, "--max_train_steps",
                         ONE_SHOT_STEPS, "--learning_rate", 3e-3, "--seed", 5, "--checkpointing_steps", 1, *ONE_SHOT,
                         *extra, "--output_dir", out])


@pytest.fixture(scope="module")
def one_shot_trained(assets):
    out = assets["root"] / "oneshot-train"
    proc = _one_shot_run(assets, out)
    _check_ok(proc)
    return out, proc


def _stored_ratio(sd):
    """``(L, R and the nonzero rows of S) / dense`` over the LoSparse layers of a state dict (the effective ratio;
    a rank-0 layer's empty L and R may be absent from a safetensors file)."""
    kept = dense = 0
    for k in [k for k in sd if k.endswith("sparse.weight")]:
        p, (H, W) = k[: -len("sparse.weight")], sd[k].shape
        rank = sd[p + "left.weight"].shape[1] if p + "left.weight" in sd else 0
        dense += H * W
        kept += rank * (H + W) + int((sd[k] != 0).any(1).sum()) * W
    return kept / dense


def test_one_shot_then_training_never_exceeds_the_budget(one_shot_trained):
    """The rows the allocation zeroed stay zero from the first step (the Pruner's keep_zero_rows): the state saved
    after every optimizer step, warm-up included, holds at most the budget, and so does every logged ratio."""
    import re

    from safetensors.torch import load_file

    out, proc = one_shot_trained
    folders = sorted(out.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    assert [p.name for p in folders] == [f"step_{i}" for i in range(1, ONE_SHOT_STEPS + 1)]
    ratios = [_stored_ratio(load_file(p / "model.safetensors")) for p in folders]
    final = _stored_ratio(torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True))
    assert max(ratios + [final]) <= 0.5  # --low_rank_parameter_ratio + --final_threshold
    assert ratios == [final] * len(ratios)  # PLATON prunes on from the allocated rows: none comes back
    logged = [float(x) for x in re.findall(r"effective ratio ([0-9.]+)", proc.stderr)]
    assert logged and max(logged) <= 0.5 and _results(out)["effective_ratio"] == pytest.approx(final)
    assert "keep_zero_rows" in proc.stderr


def test_one_shot_run_resumes_exactly(assets, one_shot_trained):
    """A one-shot training run stopped after its second checkpoint resumes (``--resume_from_checkpoint latest``)
    with every layer at its allocated rank and rows, without calibrating again, and ends bit-identical."""
    import shutil

    full, _ = one_shot_trained
    resumed = assets["root"] / "oneshot-resumed"
    resumed.mkdir()
    shutil.copytree(full / "step_2", resumed / "step_2")  # what a run interrupted after step 2's checkpoint leaves
    proc = _one_shot_run(assets, resumed, "--resume_from_checkpoint", "latest")
    _check_ok(proc)
    assert f"Resumed from checkpoint: {resumed / 'step_2'}" in proc.stdout
    assert "LoSparse calibration" not in proc.stderr and "One-shot allocation of" in proc.stderr
    a = torch.load(full / "pytorch_model.bin", map_location="cpu", weights_only=True)
    b = torch.load(resumed / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert a.keys() == b.keys()
    assert len({a[k].shape[1] for k in a if k.endswith("left.weight")}) > 1  # ranks differ from layer to layer
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
    ra, rb = _results(full), _results(resumed)
    assert (rb["perplexity"], rb["effective_ratio"], rb["train_steps"]) == \
        (ra["perplexity"], ra["effective_ratio"], ra["train_steps"])


def test_short_calibration_file_is_named(assets, tmp_path):
    root = assets["root"]
    short = tmp_path / "short.txt"
    short.write_text("the cat\n")
    with pytest.raises(SystemExit) as e:
        run_clm.main(["--model_name_or_path", str(root / "llama"), "--train_file", str(root / "train.txt"),
                      "--validation_file", str(root / "validation.txt"), "--calibration_file", str(short),
                      "--init", "calibrated", "--block_size", str(BLOCK), "--num_train_epochs", "0",
                      "--output_dir", str(tmp_path / "out")])
    assert f"--calibration_file {short} has fewer tokens than one block of --block_size {BLOCK}" in str(e.value)


# ----------------------------------------------------------------------------------------------------
# Usage errors: before training, naming the flag
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (["--validation_file", "{root}/validation.txt", "--block_size", "512", "--num_train_epochs", "0"],
     "--block_size 512 is larger than the model's context (128"),
    (["--validation_file", "{root}/validation.jsonl", "--text_column", "title", "--num_train_epochs", "0"],
     "--text_column title is not a column"),
])
def test_bad_input_exits_before_training(assets, flags, expected):
    root = assets["root"]
    flags = [f.format(root=root) for f in flags]
    with pytest.raises(SystemExit) as e:
        run_clm.main(["--model_name_or_path", str(root / "llama"), "--no_losparse", *flags])
    assert expected in str(e.value)


def test_no_text_column_exits(assets, tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text("".join(json.dumps({"a": i, "b": 2.0 * i}) + "\n" for i in range(10)))
    with pytest.raises(SystemExit) as e:
        run_clm.main(["--model_name_or_path", str(assets["root"] / "llama"), "--validation_file", str(path),
                      "--num_train_epochs", "0", "--no_losparse"])
    assert "no text column" in str(e.value) and "--text_column" in str(e.value)


@pytest.mark.parametrize("flags, expected", [
    (["--gguf_file", "missing.gguf"], "--gguf_file missing.gguf: no such file in --model_name_or_path"),
    (["--block_size", "1"], "--block_size must be >= 2"),
    (["--train_file", "{root}/train.csv"], "--train_file {root}/train.csv does not exist"),
    (["--train_file", "{root}/train.parquet"], "--train_file should be a txt/csv/json/jsonl file"),
    (["--dataset_name", "wikitext"], "not both"),
    (["--eval_split", "test"], "--eval_split test needs --dataset_name"),
    (["--validation_split_percentage", "0"], "--validation_split_percentage must be in (0, 100)"),
    (["--final_threshold", "0"], "--final_threshold must be in (0, 1]"),
    (["--one_shot", "--structured_direction", "col"], "--one_shot keeps whole rows of S: --structured_direction col"),
    (["--one_shot", "--structured_direction", "row_col"], "--one_shot keeps whole rows of S: --structured_direction "
                                                          "row_col"),
    (["--init", "calibrated", "--one_shot", "--structured_method", "none"], "--one_shot keeps whole rows of S: "
                                                                            "--structured_method none"),
    (["--num_train_epochs", "0", "--eval_checkpoint", "{root}/validation.txt", "--no_losparse"],
     "--eval_checkpoint loads a LoSparse checkpoint"),
])
def test_parse_args_errors(assets, capsys, flags, expected):
    root = assets["root"]
    flags = [f.format(root=root) for f in flags]
    with pytest.raises(SystemExit):
        run_clm.parse_args(["--model_name_or_path", str(root / "llama"), "--train_file", str(root / "train.txt"),
                            *flags])
    assert expected.format(root=root) in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# train_clm.sh: its commands parse
# ----------------------------------------------------------------------------------------------------
def test_train_clm_sh_commands_parse():
    import os
    import shlex
    import subprocess

    proc = subprocess.run(["bash", str(REPO / "train_clm.sh"), "all"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON="echo"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    cmds = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("run_clm.py")]
    parsed = [run_clm.parse_args(cmd[1:]) for cmd in cmds]
    models = {a.model_name_or_path for a in parsed}
    assert {"Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "meta-llama/Llama-3.1-8B"} <= models
    for a in parsed:
        assert (a.dataset_name, a.dataset_config_name, a.eval_split, a.block_size) == \
            ("wikitext", "wikitext-2-raw-v1", "test", 2048)
    assert [a.fsdp2 for a in parsed] == [False, False, False, True]  # llama8b-fsdp2 shards with FSDP2


def test_bench_generate_smoke():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_generate.py"), "--models", "llama7b",
                           "--layers", "1", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "300",
                           "--prompt-len", "8", "--new-tokens", "3", "--reps", "1", "--warmup", "0", "--threads", "1",
                           "--ratios", "0.3"], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows[0]["what"] == "env"
    gen = {r["variant"]: r for r in rows if r["what"] == "generate"}
    assert set(gen) == {"dense", "compact_0.3"}
    assert gen["dense"]["effective_ratio"] == 1.0 and gen["dense"]["decode_speedup"] == 1.0
    # low-rank 0.05 (ranks rounded up) + round(0.25 x rows) of every S
    assert gen["compact_0.3"]["effective_ratio"] == pytest.approx(0.3, abs=0.05)
    assert gen["compact_0.3"]["params"] < gen["dense"]["params"]
    for r in gen.values():
        assert r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["bytes_bound"] == pytest.approx(gen["dense"]["params"] / r["params"], abs=1e-3)
    # --split half: half of each ratio in L and R, half in rows of S
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_generate.py"), "--models", "llama7b",
                           "--layers", "1", "--hidden-size", "64", "--intermediate-size", "128", "--vocab-size", "300",
                           "--prompt-len", "8", "--new-tokens", "3", "--reps", "1", "--warmup", "0", "--threads", "1",
                           "--ratios", "0.5,0.9", "--split", "half"], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    gen = {r["variant"]: r for r in map(json.loads, proc.stdout.splitlines()) if r["what"] == "generate"}
    assert set(gen) == {"dense", "compact_0.5", "compact_0.9"}
    for ratio in (0.5, 0.9):
        assert gen[f"compact_{ratio:g}"]["effective_ratio"] == pytest.approx(ratio, abs=0.03)
        assert gen[f"compact_{ratio:g}"]["bytes_bound"] > 1


def test_run_clm_fsdp2_matches_one_process(assets):
    """``--fsdp2`` over 2 gloo processes (2 x 2 blocks) against 1 process (1 x 4): same masks, weights, ratio."""
    import os
    import subprocess
    import sys

    root = assets["root"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true",
               PYTHONPATH=str(REPO), **assets["env"])
    runs = {}
    for name, launcher, batch, extra in (("single", [], 4, []),
                                         ("fsdp2", ["-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", "2"], 2, ["--fsdp2"])):
        out = root / f"fsdp2-{name}"
        args = ["--model_name_or_path", root / "llama", "--train_file", root / "train.txt", "--validation_file",
                root / "validation.txt", "--block_size", BLOCK, "--max_train_samples", 16,
                "--per_device_train_batch_size", batch, "--per_device_eval_batch_size", 4, "--max_train_steps", 12,
                "--learning_rate", 3e-3, "--seed", 5, *LOSPARSE, "--output_dir", out, *extra]
        proc = subprocess.run([sys.executable, *launcher, str(REPO / "run_clm.py"), *[str(a) for a in args]],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        _check_ok(proc)
        runs[name] = (out, proc.stdout + proc.stderr)
    assert "model sharded with FSDP2 (fully_shard) over 2 ranks" in runs["fsdp2"][1]
    one = torch.load(runs["single"][0] / "pytorch_model.bin", weights_only=True)
    two = torch.load(runs["fsdp2"][0] / "pytorch_model.bin", weights_only=True)
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in two.items()}
    zeroed = 0
    for k, v in one.items():
        if k.endswith("sparse.weight"):
            assert torch.equal((v == 0).all(dim=1), (two[k] == 0).all(dim=1)), k  # the same rows pruned
            zeroed += int((v == 0).all(dim=1).sum())
        assert (v - two[k]).abs().max() <= 1e-4 * max(1.0, v.abs().max().item()), k
    assert zeroed > 0
    r1, r2 = _results(runs["single"][0]), _results(runs["fsdp2"][0])
    assert r1["effective_ratio"] == r2["effective_ratio"]
    assert r2["perplexity"] == pytest.approx(r1["perplexity"], rel=1e-4)
    from safetensors.torch import load_file
    c1, c2 = load_file(runs["single"][0] / "compact" / utils.COMPACT_WEIGHTS), \
        load_file(runs["fsdp2"][0] / "compact" / utils.COMPACT_WEIGHTS)
    assert {k: v.shape for k, v in c1.items()} == {k: v.shape for k, v in c2.items()}
