"""The shipped data set (data/wordnet_topics) and the README images (asset/)."""
import csv
import hashlib
import importlib.util
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "wordnet_topics"
ASSET = REPO / "asset"

CLASSES = {"noun.animal", "noun.artifact", "noun.body", "noun.food",
           "noun.location", "noun.person", "noun.plant", "noun.substance"}
ROWS = {"train": 4000, "validation": 800}
PER_CLASS = {"train": 500, "validation": 100}


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_wordnet_topics", REPO / "data" / "build_wordnet_topics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(split):
    with open(DATA / f"{split}.csv", encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("split", ["train", "validation"])
def test_csv_header_counts_and_balance(split):
    rows = _read(split)
    assert rows[0] == ["sentence1", "label"]
    body = rows[1:]
    assert len(body) == ROWS[split]
    assert all(len(r) == 2 for r in body)
    counts = Counter(label for _, label in body)
    assert set(counts) == CLASSES
    assert set(counts.values()) == {PER_CLASS[split]}
    texts = [t for t, _ in body]
    assert all(t.strip() == t and len(t.split()) >= 4 for t in texts)
    assert len({t.casefold() for t in texts}) == len(texts)
    # classes are interleaved, not written in blocks
    assert len({label for _, label in body[:40]}) == len(CLASSES)


def test_no_text_shared_between_train_and_validation():
    train = {t.casefold() for t, _ in _read("train")[1:]}
    validation = {t.casefold() for t, _ in _read("validation")[1:]}
    assert train.isdisjoint(validation)


def test_files_are_small_and_licensed():
    assert (DATA / "train.csv").stat().st_size + (DATA / "validation.csv").stat().st_size < 1_000_000
    licence = (DATA / "LICENSE").read_text(encoding="utf-8")
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in licence
    assert "Permission to use, copy, modify and distribute" in licence
    assert "4000" in (DATA / "README.md").read_text(encoding="utf-8")


def test_clean_gloss_drops_examples():
    builder = _load_builder()
    assert builder.clean_gloss('a domestic cat; "the cat sat"; "another"  ') == "a domestic cat"
    assert builder.clean_gloss('a "weasel word" of sorts ') == 'a "weasel word" of sorts'
    assert builder.clean_gloss('"only an example"') == ""


def test_missing_dict_dir_fails_clearly(tmp_path):
    builder = _load_builder()
    with pytest.raises(SystemExit, match="wordnet-base"):
        builder.main(["--dict-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_rebuild_is_byte_identical(tmp_path):
    builder = _load_builder()
    data_noun = Path(builder.DEFAULT_DICT_DIR) / "data.noun"
    if not data_noun.is_file():
        pytest.skip(f"WordNet not installed ({data_noun} missing; apt-get install wordnet-base to run this)")
    if hashlib.sha256(data_noun.read_bytes()).hexdigest() != builder.DEBIAN_DATA_NOUN_SHA256:
        pytest.skip(f"{data_noun} is not the Debian wordnet-base 1:3.0-37 file the committed csv came from")
    builder.main(["--out-dir", str(tmp_path)])
    for name in ("train.csv", "validation.csv", "LICENSE"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_committed_images():
    assert _png_size(ASSET / "LoSparse_diagram.png") == (1200, 470)
    assert _png_size(ASSET / "LoSparse_logo.png") == (800, 240)
    assert (ASSET / "LoSparse_diagram.png").stat().st_size < 200_000
    assert (ASSET / "LoSparse_logo.png").stat().st_size < 200_000


def test_diagram_script_draws(tmp_path):
    pytest.importorskip("matplotlib")
    subprocess.run([sys.executable, str(ASSET / "make_diagram.py"), "--out-dir", str(tmp_path)],
                   check=True, capture_output=True, timeout=60)
    assert _png_size(tmp_path / "LoSparse_diagram.png") == (1200, 470)
    assert _png_size(tmp_path / "LoSparse_logo.png") == (800, 240)
    assert 10_000 < (tmp_path / "LoSparse_diagram.png").stat().st_size < 200_000
