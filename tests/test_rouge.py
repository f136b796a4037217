"""ROUGE for run_summarization.py: the offline sentence splitter and the rouge-score wrapper."""
import pytest

import run_summarization as rs

# (text, exact expected sentences) for the data-free splitter.
SPLIT_CASES = [
    # titles and abbreviations
    ("Dr. Smith arrived at 5 p.m. The meeting began.",
     ["Dr. Smith arrived at 5 p.m.", "The meeting began."]),
    ("Mr. and Mrs. Jones met Prof. Lee at St. Paul's. They talked.",
     ["Mr. and Mrs. Jones met Prof. Lee at St. Paul's.", "They talked."]),
    ("The U.S. Army said so. It was late (about 10 p.m.). Nobody came.",
     ["The U.S. Army said so.", "It was late (about 10 p.m.).", "Nobody came."]),
    ("E.g. apples, i.e. fruit, etc. are sold. Fine.",
     ["E.g. apples, i.e. fruit, etc. are sold.", "Fine."]),
    ("We bought apples, pears, etc. The rest was sold.",
     ["We bought apples, pears, etc.", "The rest was sold."]),
    ("He lives at No. 10 Downing St. in London. He said no. Then he left.",
     ["He lives at No. 10 Downing St. in London.", "He said no.", "Then he left."]),
    ("Shares of Acme Inc. rose. Acme Inc. It was a good day.",
     ["Shares of Acme Inc. rose.", "Acme Inc.", "It was a good day."]),
    ("The meeting ended at 11 a.m. on Monday. Talks resume at 9 a.m. The deal is close.",
     ["The meeting ended at 11 a.m. on Monday.", "Talks resume at 9 a.m.", "The deal is close."]),
    ("The talks ended at 5 p.m. Dr. Smith left. The U.S. Sen. John Doe stayed.",
     ["The talks ended at 5 p.m.", "Dr. Smith left.", "The U.S. Sen. John Doe stayed."]),
    # single initials
    ("J. K. Rowling wrote it. George W. Bush read it.",
     ["J. K. Rowling wrote it.", "George W. Bush read it."]),
    # decimals and numbers
    ("Prices rose 3.5 percent. Analysts expected 2.1.",
     ["Prices rose 3.5 percent.", "Analysts expected 2.1."]),
    ("Version 2.0 shipped on Jan. 5. It cost $3.50. Sales rose 12.5%.",
     ["Version 2.0 shipped on Jan. 5.", "It cost $3.50.", "Sales rose 12.5%."]),
    # quotes and brackets closing the sentence
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("She said \u201cI agree.\u201d Then she smiled.", ["She said \u201cI agree.\u201d", "Then she smiled."]),
    ("(This is a note.) The end.", ["(This is a note.)", "The end."]),
    ("He shouted 'Run!' Everyone ran.", ["He shouted 'Run!'", "Everyone ran."]),
    ('"Why?" he asked. "Because!" She left.', ['"Why?" he asked.', '"Because!"', "She left."]),
    # ellipses, ? and !
    ("Wait... What happened? Nothing... and then silence.",
     ["Wait...", "What happened?", "Nothing... and then silence."]),
    ("Really?! Yes. No!", ["Really?!", "Yes.", "No!"]),
    ("It went on\u2026 Then it stopped.", ["It went on\u2026", "Then it stopped."]),
    # uncased text (e.g. an uncased tokenizer's output): ordinary words still end sentences
    ("the cat sat. the dog ran.", ["the cat sat.", "the dog ran."]),
    # newlines are boundaries; blank input gives nothing
    ("First line\nSecond line.", ["First line", "Second line."]),
    ("One sentence without a period", ["One sentence without a period"]),
    ("  ", []),
]


@pytest.mark.parametrize("text,expected", SPLIT_CASES, ids=[c[0][:30] for c in SPLIT_CASES])
def test_regex_splitter(text, expected):
    assert rs.split_sentences_regex(text) == expected


def test_regex_splitter_keeps_every_character():
    text = 'Dr. Who met Mr. X. at 5 p.m. "Fine," he said. It cost 3.5 dollars... Good!'
    assert " ".join(rs.split_sentences_regex(text)) == text


@pytest.fixture
def no_punkt(monkeypatch):
    """Make nltk's punkt data look absent; fail if anything tries to download it."""
    import nltk

    def _missing(*a, **k):
        raise LookupError("no punkt here")

    def _no_download(*a, **k):
        raise AssertionError("nltk.download must never be called")

    monkeypatch.setattr(nltk.data, "find", _missing)
    monkeypatch.setattr(nltk, "download", _no_download)
    rs._punkt_sent_tokenize.cache_clear()
    yield
    rs._punkt_sent_tokenize.cache_clear()


def test_auto_falls_back_to_regex_without_punkt(no_punkt):
    assert rs.resolve_sentence_splitter("auto") == "regex"
    text = "Dr. Smith arrived at 5 p.m. The meeting began."
    assert rs.split_sentences(text) == ["Dr. Smith arrived at 5 p.m.", "The meeting began."]
    with pytest.raises(LookupError, match="--sentence_splitter"):
        rs.resolve_sentence_splitter("nltk")
    with pytest.raises(ValueError, match="--sentence_splitter"):
        rs.resolve_sentence_splitter("spacy")


def test_auto_uses_punkt_when_its_data_is_installed(monkeypatch):
    import nltk

    calls = []

    def fake_sent_tokenize(text, language="english"):
        calls.append(text)
        return [w + "|" for w in text.split(" | ")]

    monkeypatch.setattr(nltk.data, "find", lambda resource, *a, **k: resource)
    monkeypatch.setattr(nltk, "sent_tokenize", fake_sent_tokenize)
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download called"))
    rs._punkt_sent_tokenize.cache_clear()
    try:
        assert rs.resolve_sentence_splitter("auto") == "nltk"
        assert rs.split_sentences("a | b\nc", "auto") == ["a|", "b|", "c|"]  # one punkt call per line
        assert rs.split_sentences("a | b", "regex") == ["a | b"]
    finally:
        rs._punkt_sent_tokenize.cache_clear()


# ---------------------------------------------------------------------------------------------------
# ROUGE wrapper vs rouge_score used directly
# ---------------------------------------------------------------------------------------------------
def _direct(pred_lines, ref_lines):
    """rouge_score on texts already split one sentence per line; mean F x 100."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    out = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    for p, r in zip(pred_lines, ref_lines):
        s = scorer.score(r, p)
        for k in out:
            out[k] += s[k].fmeasure
    return {k: 100 * v / len(pred_lines) for k, v in out.items()}


PAIRS = [
    # (prediction, reference, both split by hand one sentence per line)
    ("The dog ran. The cat sat.", "The cat sat. The dog ran.",
     "The dog ran.\nThe cat sat.", "The cat sat.\nThe dog ran."),
    ("Dr. Smith arrived at 5 p.m. The meeting began late.", "The meeting began at 5 p.m. Dr. Smith arrived.",
     "Dr. Smith arrived at 5 p.m.\nThe meeting began late.", "The meeting began at 5 p.m.\nDr. Smith arrived."),
    ("Prices rose 3.5 percent on Monday.", "Prices rose by 3.5 percent. Analysts were surprised.",
     "Prices rose 3.5 percent on Monday.", "Prices rose by 3.5 percent.\nAnalysts were surprised."),
    ('He said "Stop." Then the cats were running.', "The cat runs. He said stop.",
     'He said "Stop."\nThen the cats were running.', "The cat runs.\nHe said stop."),
    ("", "An empty prediction scores zero.", "", "An empty prediction scores zero."),
]


def test_wrapper_matches_rouge_score_per_example():
    for pred, ref, pred_lines, ref_lines in PAIRS:
        got = rs.compute_rouge([pred], [ref], splitter="regex")
        want = _direct([pred_lines], [ref_lines])
        assert set(got) == set(want)
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-9), (pred, k)


def test_wrapper_is_mean_over_examples():
    preds = [p[0] for p in PAIRS]
    refs = [p[1] for p in PAIRS]
    got = rs.compute_rouge(preds, refs, splitter="regex")
    want = _direct([p[2] for p in PAIRS], [p[3] for p in PAIRS])
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9)


def test_hand_computed_values():
    # unigram overlap 3 of 6 predicted / 3 of 3 reference: F = 2 * 0.5 * 1 / 1.5
    got = rs.compute_rouge(["the cat sat on the mat"], ["the cat sat"], splitter="regex")
    assert got["rouge1"] == pytest.approx(200 / 3, abs=1e-9)
    assert got["rouge2"] == pytest.approx(100 * 2 * (2 / 5) * 1 / (2 / 5 + 1), abs=1e-9)
    assert got["rougeL"] == pytest.approx(200 / 3, abs=1e-9)


def test_rougeLsum_uses_sentence_splitting():
    # Swapped sentences: the LCS over the whole text covers half; the union LCS per sentence covers all.
    got = rs.compute_rouge(["The dog ran. The cat sat."], ["The cat sat. The dog ran."], splitter="regex")
    assert got["rougeL"] == pytest.approx(50.0, abs=1e-9)
    assert got["rougeLsum"] == pytest.approx(100.0, abs=1e-9)
    assert got["rouge1"] == pytest.approx(100.0, abs=1e-9)
    # An abbreviation is not a boundary: "Dr." must not split "Dr. Smith".
    got = rs.compute_rouge(["Dr. Smith left. Mr. Jones stayed."], ["Mr. Jones stayed. Dr. Smith left."],
                           splitter="regex")
    assert got["rougeLsum"] == pytest.approx(100.0, abs=1e-9)


def test_stemming_is_on():
    got = rs.compute_rouge(["cats running"], ["cat runs"], splitter="regex")
    assert got["rouge1"] == pytest.approx(100.0, abs=1e-9)
    assert rs.compute_rouge(["cats running"], ["cat runs"], splitter="regex", use_stemmer=False)["rouge1"] == 0.0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rs.compute_rouge(["a", "b"], ["a"])
