"""The README's "Plug into your code" snippet runs and prunes to the advertised ratio."""
import re

import pytest
import torch

from conftest import REPO


def _snippet():
    text = (REPO / "README.md").read_text()
    section = text.split("## Plug into your code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns = {}
    exec(compile(_snippet(), "README.md", "exec"), ns)
    utils, model, small = ns["utils"], ns["model"], ns["small"]
    rep = utils.compression_report(model)
    assert len(rep.layers) == 12
    # kept sparse fraction == final_threshold (0.15) within one row per layer
    assert rep.sparse_params == pytest.approx(0.15 * rep.dense_params, abs=sum(l["in_features"] for l in rep.layers))
    assert (tmp_path / "pytorch_model.bin").is_file() and (tmp_path / "compact_model" / "losparse_model.safetensors").is_file()
    ids = torch.randint(0, 100, (2, 7))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def _parser_flags(module):
    """Every --flag of a script's parser (its parse_args is run with --help, which exits after parsing)."""
    import argparse

    seen = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        seen["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            module.parse_args([]) if module.parse_args.__code__.co_argcount else module.parse_args()
    finally:
        argparse.ArgumentParser.parse_args = real
    return {s for a in seen["parser"]._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


@pytest.mark.parametrize("script", ["run_glue", "run_qa", "run_summarization", "run_clm"])
def test_every_flag_is_in_the_readme(script):
    import importlib

    text = (REPO / "README.md").read_text()
    flags = _parser_flags(importlib.import_module(script))
    assert len(flags) > 40
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w])", text))
    assert missing == []
