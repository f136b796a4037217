"""utils.export_compact folders load with plain transformers (``trust_remote_code=True``), without this repository.

In process: tiny LLaMA, Qwen2 (q/k/v biases, tied embeddings), BERT classifier, BERT QA and BART are compressed,
compacted and exported; their reference outputs (logits, greedy and sampled generation, pipeline results) are
computed with the compacted layers on the "fused" form, the arithmetic of modeling_losparse.py. One subprocess
(``python -I``, cwd outside the repository, no PYTHONPATH) then loads every folder with
``AutoModelFor...from_pretrained(..., trust_remote_code=True)`` and compares: logits with torch.equal, generated
tokens one for one, pipeline outputs, save_pretrained + reload, from_config; it also loads broken folders and
plain from_pretrained without trust_remote_code, and records the error messages.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO, VOCAB, make_tokenizer, tiny_config

import utils

V = len(dict.fromkeys(VOCAB))
ALLOW = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "query", "key", "value",
         "dense", "fc1", "fc2", "out_proj"]
BLOCK = ["lm_head", "pooler", "classifier", "embeddings", "LayerNorm", "shared"]
IDS = [[5, 9, 20, 33, 40, 41, 7, 60, 61]]
AUTO = {"llama": "AutoModelForCausalLM", "qwen2": "AutoModelForCausalLM",
        "bert": "AutoModelForSequenceClassification", "bert_qa": "AutoModelForQuestionAnswering",
        "bart": "AutoModelForSeq2SeqLM"}
BROKEN = ("no_config", "no_weights", "config_rank", "weight_shape", "bad_index", "dup_index")


def _model(family):
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=V, num_hidden_layers=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                  eos_token_id=3, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**common))
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**common, tie_word_embeddings=True))
    if family == "bert":
        return T.BertForSequenceClassification(tiny_config("bert"))
    if family == "bert_qa":
        return T.BertForQuestionAnswering(tiny_config("bert"))
    return T.BartForConditionalGeneration(tiny_config("bart"))


def _compress(model):
    """STEP 1, then every other layer keeps a third of its S's rows (form 'losparse') and the others a quarter of
    its columns (column-structured pruning: form 'losparse_cols'); compacted."""
    utils.substitute_layer_weights(model, ALLOW, BLOCK, parameter_ratio=0.1)
    with torch.no_grad():
        layers = [m for m in model.modules() if isinstance(m, utils.LinearLoSparse)]
        for i, m in enumerate(layers):
            if i % 2:
                m.sparse.weight.mul_((torch.arange(m.in_feature) % 4 == 0)[None, :].float())
            else:
                m.sparse.weight.mul_((torch.arange(m.out_feature) % 3 == 0)[:, None].float())
            if m.has_bias:
                m.bias.normal_()
    utils.prune(model)
    forms = {m.sparse_weight_pruned_cols is not None for m in layers}
    assert forms == {True, False}, "both compact forms must be exported"
    return model.eval()


def _set_path(model, path):
    for m in model.modules():
        if isinstance(m, utils.LinearLoSparse):
            m.compact_path = path


def _forward(model, family):
    ids = torch.tensor(IDS)
    with torch.no_grad():
        if family == "bart":
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        if family == "bert_qa":
            out = model(input_ids=ids)
            return torch.stack([out.start_logits, out.end_logits])
        return model(input_ids=ids).logits


def _reference(model, family, folder, tok):
    """What the subprocess must reproduce, from the in-memory compacted model."""
    from transformers import pipeline

    _set_path(model, None)
    ref = {"logits_default": _forward(model, family)}
    _set_path(model, "fused")
    ref["logits"] = _forward(model, family)
    ids = torch.tensor(IDS)
    if family in ("llama", "qwen2", "bart"):
        ref["greedy"] = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        torch.manual_seed(7)
        ref["sampled"] = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=0, use_cache=True)
    if family in ("llama", "qwen2"):
        p = pipeline("text-generation", model=model, tokenizer=tok)
        ref["pipeline"] = p("the cat sat on", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    if family == "bert":
        p = pipeline("text-classification", model=model, tokenizer=tok)
        ref["pipeline"] = p("the movie was good")[0]
    return ref


def _break(src, dst, how):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    sd = load_file(str(dst / "losparse_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    if how == "no_config":
        (dst / "config.json").unlink()
    elif how == "no_weights":
        (dst / "losparse_model.safetensors").unlink()
    elif how == "config_rank":
        cfg["losparse_layers"][name]["rank"] += 1
        (dst / "config.json").write_text(json.dumps(cfg))
    elif how == "weight_shape":
        sd[name + ".left.weight"] = sd[name + ".left.weight"][:, :-1].contiguous()
    elif how in ("bad_index", "dup_index"):
        idx = sd[name + ".nonzero_idx"].clone()
        idx[-1] = 32 if how == "bad_index" else idx[0]  # q_proj has 32 output rows
        sd[name + ".nonzero_idx"] = idx
    if how in ("weight_shape", "bad_index", "dup_index"):
        save_file(sd, str(dst / "losparse_model.safetensors"), metadata={"format": "pt"})
    return dst


CHILD = textwrap.dedent('''
    import importlib.util, json, sys, torch, transformers
    from pathlib import Path
    assert importlib.util.find_spec("utils") is None and importlib.util.find_spec("conftest") is None, sys.path
    root = Path(sys.argv[1]); refs = torch.load(root / "refs.pt"); res = {}
    ids = torch.tensor(refs["ids"])
    def fwd(m, family):
        with torch.no_grad():
            if family == "bart":
                return m(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
            if family == "bert_qa":
                out = m(input_ids=ids)
                return torch.stack([out.start_logits, out.end_logits])
            return m(input_ids=ids).logits
    for family, auto in refs["auto"].items():
        ref, r = refs[family], {}
        folder = str(root / family)
        m = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True)
        r["class"] = type(m).__name__
        r["bases"] = [c.__name__ for c in type(m).__mro__]
        r["training"] = m.training
        lg = fwd(m, family)
        r["logits_equal"] = torch.equal(lg, ref["logits"])
        r["logits_default_maxdiff"] = float((lg - ref["logits_default"]).abs().max())
        if "greedy" in ref:
            r["greedy_equal"] = torch.equal(m.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True),
                                            ref["greedy"])
            torch.manual_seed(7)
            r["sampled_equal"] = torch.equal(m.generate(ids, max_new_tokens=8, do_sample=True, top_k=0,
                                                        use_cache=True), ref["sampled"])
        if family in ("llama", "qwen2"):
            p = transformers.pipeline("text-generation", model=folder, trust_remote_code=True)
            r["pipeline"] = p("the cat sat on", max_new_tokens=6, do_sample=False)[0]["generated_text"]
        if family == "bert":
            p = transformers.pipeline("text-classification", model=folder, trust_remote_code=True)
            r["pipeline"] = p("the movie was good")[0]
        tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        r["tok"] = tok("the cat sat")["input_ids"]
        m.save_pretrained(root / (family + "-resaved"))
        m2 = getattr(transformers, auto).from_pretrained(str(root / (family + "-resaved")), trust_remote_code=True)
        r["resaved_equal"] = torch.equal(fwd(m2, family), ref["logits"])
        r["resaved_files"] = sorted(p.name for p in (root / (family + "-resaved")).iterdir())
        if family == "llama":  # from_config: the same shapes, the source model's random init, finite
            cfg = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
            m0 = getattr(transformers, auto).from_config(cfg, trust_remote_code=True)
            shapes = lambda mod: {k: tuple(v.shape) for k, v in mod.state_dict().items()}
            r["from_config_shapes"] = shapes(m0) == shapes(m)
            r["from_config_finite"] = all(bool(torch.isfinite(v).all()) for v in m0.state_dict().values()
                                          if v.is_floating_point())
            r["from_config_class"] = type(m0).__name__
        res[family] = r
    errors = {}
    for how in refs["broken"] + ["plain"]:
        folder = str(root / ("llama" if how == "plain" else "broken-" + how))
        try:
            transformers.AutoModelForCausalLM.from_pretrained(folder, **({} if how == "plain" else
                                                                       {"trust_remote_code": True}))
            errors[how] = None
        except Exception as e:
            errors[how] = type(e).__name__ + ": " + str(e)
    res["errors"] = errors
    (root / "results.json").write_text(json.dumps(res))
''')


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    tok = make_tokenizer()
    refs, models = {"ids": IDS, "auto": AUTO, "broken": list(BROKEN)}, {}
    for family in AUTO:
        model = _compress(_model(family))
        utils.export_compact(model, root / family, tokenizer=tok)
        refs[family] = _reference(model, family, root / family, tok)
        models[family] = model
    for how in BROKEN:
        _break(root / "llama", root / f"broken-{how}", how)
    torch.save(refs, root / "refs.pt")
    (root / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_MODULES_CACHE=str(root / "hf_modules"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", str(root / "child.py"), str(root)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {"root": root, "refs": refs, "models": models, "res": json.loads((root / "results.json").read_text())}


@pytest.mark.parametrize("family", list(AUTO))
def test_loads_without_the_repository_and_matches_the_compacted_model(exported, family):
    r, ref = exported["res"][family], exported["refs"][family]
    base = type(exported["models"][family]).__name__
    assert r["class"] == "LoSparse" + AUTO[family][len("AutoModel"):] and base in r["bases"]
    assert r["training"] is False
    assert r["logits_equal"]  # the "fused" arithmetic, bit for bit
    assert r["logits_default_maxdiff"] < 1e-5  # the in-memory model's own choice of form (merged, onehot, ...)
    if family in ("llama", "qwen2", "bart"):
        assert r["greedy_equal"] and r["sampled_equal"]  # with the KV cache
    if family in ("llama", "qwen2", "bert"):
        assert r["pipeline"] == ref["pipeline"]
    assert r["resaved_equal"]
    assert r["tok"] == make_tokenizer()("the cat sat")["input_ids"]
    if family == "llama":
        assert r["from_config_shapes"] and r["from_config_finite"] and r["from_config_class"] == r["class"]
    assert {"config.json", "losparse_model.safetensors", "modeling_losparse.py", "README.md"} <= set(r["resaved_files"])
    if family in ("llama", "qwen2", "bart"):
        assert "generation_config.json" in r["resaved_files"]


@pytest.mark.parametrize("family", list(AUTO))
def test_folder_contents_and_load_compact(exported, family):
    folder = exported["root"] / family
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "losparse"
    assert cfg["auto_map"]["AutoConfig"] == "modeling_losparse.LoSparseConfig"
    assert cfg["auto_map"][AUTO[family]].startswith("modeling_losparse.LoSparseFor")
    assert cfg["base_architecture"] == type(exported["models"][family]).__name__
    assert (folder / "modeling_losparse.py").read_bytes() == utils.REMOTE_CODE_FILE.read_bytes()
    assert utils.REMOTE_CODE_FILE == REPO / "losparse" / "remote_code" / "modeling_losparse.py"
    assert (folder / "tokenizer_config.json").is_file()
    assert (folder / "generation_config.json").is_file() == (family in ("llama", "qwen2", "bart"))
    rep = utils.compression_report(exported["models"][family])
    card = (folder / "README.md").read_text()
    size = (folder / "losparse_model.safetensors").stat().st_size
    for text in (f"{rep.effective_ratio:.2%}", f"{rep.low_rank_params / rep.dense_params:.2%}",
                 f"{rep.sparse_params / rep.dense_params:.2%}", f"{rep.model_params:,}", f"{size:,} bytes",
                 f'{AUTO[family]}.from_pretrained("{family}", trust_remote_code=True)', "python "):
        assert text in card
    assert cfg["losparse"]["effective_ratio"] == pytest.approx(rep.effective_ratio)
    model = exported["models"][family]
    reloaded = utils.load_compact(folder)
    _set_path(model, None)
    assert torch.equal(_forward(reloaded, family), _forward(model, family))


def test_refuses_plain_loading_and_broken_folders(exported):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    errors = exported["res"]["errors"]
    assert "trust_remote_code=True" in errors["plain"]
    assert "config.json" in errors["no_config"]
    assert "losparse_model.safetensors" in errors["no_weights"]
    assert "losparse_model.safetensors does not match config.json" in errors["config_rank"]
    assert "model.layers.0.self_attn.q_proj.left.weight" in errors["config_rank"]
    assert "losparse_model.safetensors does not match config.json" in errors["weight_shape"]
    assert "q_proj.left.weight: file (32, 1) vs config.json (32, 2)" in errors["weight_shape"]
    for how in ("bad_index", "dup_index"):
        assert ("losparse_model.safetensors: model.layers.0.self_attn.q_proj.nonzero_idx must hold 11 distinct"
                in errors[how])
    # the source class alone finds no weights it could load (rather than initialising the projections at random)
    with pytest.raises(OSError, match="model.safetensors"):
        LlamaForCausalLM.from_pretrained(exported["root"] / "llama")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(exported["root"] / "llama", trust_remote_code=False)
    # utils.load_compact on the same broken folders: the file is named too
    root = exported["root"]
    with pytest.raises(utils.CheckpointMismatchError, match=r"losparse_model\.safetensors does not match"):
        utils.load_compact(root / "broken-weight_shape")
    for how in ("bad_index", "dup_index"):
        with pytest.raises(utils.CheckpointMismatchError,
                           match=r"losparse_model\.safetensors: .*q_proj\.nonzero_idx must"):
            utils.load_compact(root / f"broken-{how}")
    with pytest.raises(FileNotFoundError, match="config.json"):
        utils.load_compact(root / "broken-no_config")


def test_load_compact_reads_folders_of_the_previous_format(exported, tmp_path):
    """Folders written before this change: plain config.json, weights in model.safetensors, no remote code."""
    old = tmp_path / "old"
    shutil.copytree(exported["root"] / "bert", old)
    for f in ("modeling_losparse.py", "README.md"):
        (old / f).unlink()
    (old / "losparse_model.safetensors").rename(old / "model.safetensors")
    exported["models"]["bert"].config.save_pretrained(old)  # the plain BertConfig, as before
    assert json.loads((old / "config.json").read_text())["model_type"] == "bert"
    model = exported["models"]["bert"]
    _set_path(model, None)
    assert torch.equal(_forward(utils.load_compact(old), "bert"), _forward(model, "bert"))


@pytest.mark.parametrize("form", ["rows", "cols"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_remote_layer_one_token_and_autocast(form, has_bias):
    """The shipped layer (``modeling_losparse.LoSparseCompactLinear``): one token on the CPU runs matrix-vector
    products (decode) and gives the multi-token result; under CPU autocast both forms cast as ``nn.Linear`` (the
    column form's in-place product refused bf16 output with fp32 weights)."""
    import importlib.util

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _opcount import OpCounter

    spec = importlib.util.spec_from_file_location("remote_losparse", REPO / "losparse" / "remote_code" /
                                                  "modeling_losparse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    in_f, out_f, r, k = 24, 20, 3, 5
    layer = mod.LoSparseCompactLinear(in_f, out_f, r, kept_rows=k if form == "rows" else 0, has_bias=has_bias,
                                      kept_cols=k if form == "cols" else 0).eval()
    S = torch.zeros(out_f, in_f, dtype=torch.float64)
    idx = torch.randperm(out_f if form == "rows" else in_f, generator=g)[:k].sort().values
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 4)
        if form == "rows":
            layer.nonzero_idx.copy_(idx)
            S[idx] = layer.sparse_weight_pruned.double()
        else:
            layer.nonzero_col_idx.copy_(idx)
            S[:, idx] = layer.sparse_weight_pruned_cols.double()
    W = layer.left.weight.double() @ layer.right.weight.double() + S
    b = None if layer.bias is None else layer.bias.double()
    xs = torch.randn(3, 2, in_f, generator=g)
    with torch.inference_mode():
        many = layer(xs)
        torch.testing.assert_close(many.double(), torch.nn.functional.linear(xs.double(), W, b), rtol=1e-5,
                                   atol=1e-5)
        x = xs[:1, :1]
        with OpCounter() as c:
            y = layer(x)
        assert c.counts["mv"] + c.counts["addmv"] >= 2 and not c.counts["mm"] and not c.counts["addmm"]
        assert y.shape == (1, 1, out_f)
        torch.testing.assert_close(y, many[:1, :1], rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with OpCounter() as c:
                y = layer(x)
        assert y.dtype == torch.bfloat16 and not c.counts["mv"]
        torch.testing.assert_close(y.double(), many[:1, :1].double(), rtol=2e-2, atol=3e-2)
