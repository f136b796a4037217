"""utils_qa: SQuAD metric against hand-computed numbers, post-processing on hand-built logits and offsets,
window labelling with the tiny tokenizer, local file formats."""
import json

import numpy as np
import pytest

from conftest import make_tokenizer
from utils_qa import (
    answer_token_span,
    compute_f1,
    exact_match_score,
    f1_score,
    load_squad_file,
    normalize_answer,
    postprocess_qa_predictions,
    prepare_train_features,
    prepare_validation_features,
    squad_evaluate,
)

NEG = -10.0


# ----------------------------------------------------------------------------------------------------
# Metric
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, normalized", [
    ("The  Cat, sat!", "cat sat"),
    ("An apple a day", "apple day"),
    ("theory of the anthem", "theory of anthem"),  # articles only as whole words
    ("  U.S.A.\t", "usa"),
    ("", ""),
])
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_token_f1_hand_computed():
    # pred {cat, sat, on, mat} vs gold {cat, on, mat}: P = 3/4, R = 1, F1 = 6/7
    assert f1_score("the cat sat on the mat", "cat on a mat") == pytest.approx(6 / 7)
    # bag of tokens: "dog" counted once in common -> P = 1/3, R = 1, F1 = 1/2
    assert f1_score("dog dog dog", "dog") == pytest.approx(0.5)
    # repeated tokens count up to their multiplicity on both sides: common 2, P = 2/3, R = 1, F1 = 4/5
    assert f1_score("dog dog cat", "dog dog") == pytest.approx(0.8)
    assert f1_score("red", "blue") == 0.0
    assert exact_match_score("The Cat.", "cat") == 1.0
    assert exact_match_score("cat sat", "cat") == 0.0


def test_squad_v1_evaluate_hand_computed():
    predictions = {"a": "paris", "b": "the big city", "c": "red"}
    references = {"a": ["Paris", "paris france"], "b": ["big city of london"], "c": ["blue"], "d": ["dog"]}
    out = squad_evaluate(predictions, references)
    # EM: a 1, b 0, c 0, d (no prediction) 0 -> 25 %
    # F1: a max(1, 2/3) = 1; b P = 1, R = 1/2 -> 2/3; c 0; d 0 -> (1 + 2/3) / 4
    assert out["exact_match"] == pytest.approx(25.0)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 4)
    assert out["total"] == 4


def test_squad_v1_rejects_unanswerable_questions():
    with pytest.raises(ValueError, match="version_2_with_negative"):
        squad_evaluate({"a": ""}, {"a": []})


def test_squad_v2_evaluate_hand_computed():
    predictions = {"a": "paris", "b": "", "c": "", "d": "dog", "e": "big red", "f": ""}
    references = {"a": ["paris"], "b": [], "c": ["the"], "d": [], "e": ["big blue"], "f": ["a", "cat"]}
    out = squad_evaluate(predictions, references, version_2_with_negative=True)
    # exact: a 1, b 1 (no answer), c 1 (gold "the" normalises to "", so the gold is ""), d 0, e 0,
    #        f 0 (the gold "a" normalises to "" and is dropped: only "cat" remains)
    # f1:    a 1, b 1, c 1, d 0, e P = R = 1/2 -> 1/2, f 0
    assert out["exact"] == out["exact_match"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(100 * 3.5 / 6)
    assert out["total"] == 6
    # HasAns = a, c, e, f (c has an answer in the data, even if it normalises away); NoAns = b, d
    assert out["HasAns_total"] == 4 and out["NoAns_total"] == 2
    assert out["HasAns_exact"] == pytest.approx(50.0)
    assert out["HasAns_f1"] == pytest.approx(100 * 2.5 / 4)
    assert out["NoAns_exact"] == out["NoAns_f1"] == pytest.approx(50.0)


def test_v1_and_v2_f1_differ_on_empty_strings():
    # v1.1: no common token -> 0; v2.0: both empty -> 1, one empty -> 0
    assert f1_score("", "the") == 0.0
    assert compute_f1("the", "") == 1.0
    assert compute_f1("", "dog") == 0.0


# ----------------------------------------------------------------------------------------------------
# Post-processing on hand-built logits and offsets
# ----------------------------------------------------------------------------------------------------
# context: "aa bb cc dd ee ff gg"; characters: aa 0-2, bb 3-5, cc 6-8, dd 9-11, ee 12-14, ff 15-17, gg 18-20
CONTEXT = "aa bb cc dd ee ff gg"
WORD = {w: (3 * i, 3 * i + 2) for i, w in enumerate(CONTEXT.split())}


def _window(words, width):
    """Offsets of ``[CLS] q [SEP] <words> [SEP]`` (None outside the context) and flat logits of ``width``."""
    offsets = [None, None, None] + [WORD[w] for w in words] + [None]
    return offsets, np.full(width, NEG), np.full(width, NEG)


def test_answer_across_window_boundary(tmp_path):
    # Window 0 sees "aa bb cc dd", window 1 (stride overlap "cc dd") sees "cc dd ee ff gg". The gold "dd ee"
    # crosses the end of window 0: only window 1 can produce it, at its own positions.
    off0, s0, e0 = _window(["aa", "bb", "cc", "dd"], 10)  # 8 positions, logits padded to 10 with NEG
    off1, s1, e1 = _window(["cc", "dd", "ee", "ff", "gg"], 10)  # 9 positions
    s0[6], e0[6] = 5.0, 2.0       # window 0: "dd" (truncated answer), score 7
    s1[4], e1[5] = 4.0, 4.0       # window 1: "dd ee", score 8
    e1[4] = 1.0                   # window 1: "dd" again, score 5 (duplicate of window 0's span)
    examples = [{"id": "x", "context": CONTEXT}]
    features = [{"example_id": "x", "offset_mapping": off0}, {"example_id": "x", "offset_mapping": off1}]
    preds = postprocess_qa_predictions(examples, features, (np.stack([s0, s1]), np.stack([e0, e1])),
                                       n_best_size=5, output_dir=str(tmp_path))
    assert preds == {"x": "dd ee"}
    nbest = json.loads((tmp_path / "nbest_predictions.json").read_text())["x"]
    texts = [p["text"] for p in nbest]
    assert texts[:2] == ["dd ee", "dd"]
    assert len(texts) == len(set(texts))  # the same span from two windows is listed once, with its best score
    assert nbest[1]["start_logit"] + nbest[1]["end_logit"] == pytest.approx(7.0)
    assert nbest[0]["offsets"] == [9, 14]
    assert sum(p["probability"] for p in nbest) == pytest.approx(1.0)
    assert nbest[0]["probability"] / nbest[1]["probability"] == pytest.approx(np.e)  # softmax of 8 vs 7
    assert json.loads((tmp_path / "predictions.json").read_text()) == {"x": "dd ee"}
    assert not (tmp_path / "null_odds.json").exists()


def _single(setup, **kwargs):
    off, s, e = _window(["aa", "bb", "cc", "dd", "ee"], 10)  # positions 3..7 are context, 8 is [SEP], 9 past end
    s[4], e[4] = 3.0, 3.0  # the valid answer "bb", score 6
    setup(s, e)
    return postprocess_qa_predictions([{"id": "x", "context": CONTEXT}],
                                      [{"example_id": "x", "offset_mapping": off}], (s[None], e[None]),
                                      **kwargs)["x"]


def _set(**values):
    def setup(s, e):
        for key, v in values.items():
            (s if key[0] == "s" else e)[int(key[1:])] = v
    return setup


@pytest.mark.parametrize("name, setup", [
    ("question token", _set(s1=10.0, e1=10.0)),
    ("special token [SEP]", _set(s8=10.0, e8=10.0)),
    ("past the window (padding)", _set(s9=10.0, e9=10.0)),
    ("end before start", _set(s6=10.0, e3=10.0)),
])
def test_impossible_spans_are_never_predicted(name, setup):
    assert _single(_set()) == "bb"
    assert _single(setup) == "bb", name


def test_max_answer_length():
    # "aa .. ee" (5 tokens) scores 19, "bb .. ee" (4 tokens) 13, "aa bb" (2 tokens) 12
    setup = _set(s3=9.0, e7=10.0)
    assert _single(setup, max_answer_length=5) == "aa bb cc dd ee"
    assert _single(setup, max_answer_length=4) == "bb cc dd ee"
    assert _single(setup, max_answer_length=3) == "aa bb"


def test_no_valid_span_predicts_empty_string():
    off = [None] * 5
    s = e = np.zeros((1, 5))
    out = postprocess_qa_predictions([{"id": "x", "context": CONTEXT}], [{"example_id": "x", "offset_mapping": off}],
                                     (s, e))
    assert out == {"x": ""}


@pytest.mark.parametrize("threshold, expected", [(0.0, ""), (3.9, ""), (4.1, "bb"), (10.0, "bb")])
def test_v2_null_answer_against_threshold(tmp_path, threshold, expected):
    # null score = s[0] + e[0] = 10, best span "bb" = 6: score_diff = 4
    setup = _set(s0=5.0, e0=5.0)
    out = _single(setup, version_2_with_negative=True, null_score_diff_threshold=threshold, output_dir=str(tmp_path))
    assert out == expected
    assert json.loads((tmp_path / "null_odds.json").read_text()) == {"x": pytest.approx(4.0)}
    nbest = json.loads((tmp_path / "nbest_predictions.json").read_text())["x"]
    assert nbest[0]["text"] == "" and nbest[0]["start_logit"] == 5.0  # the null answer leads the n-best list
    # SQuAD v1.1 ignores the null score
    assert _single(setup) == "bb"


def test_v2_null_score_is_the_minimum_over_windows(tmp_path):
    # Window 0 wants no answer (null 10), window 1 does not (null 2); the example's null score is 2 < 6.
    off0, s0, e0 = _window(["aa", "bb", "cc", "dd"], 9)
    off1, s1, e1 = _window(["cc", "dd", "ee", "ff", "gg"], 9)
    s0[0] = e0[0] = 5.0
    s1[0] = e1[0] = 1.0
    s1[5], e1[6] = 3.0, 3.0  # "ee ff", score 6
    features = [{"example_id": "x", "offset_mapping": off0}, {"example_id": "x", "offset_mapping": off1}]
    out = postprocess_qa_predictions([{"id": "x", "context": CONTEXT}], features,
                                     (np.stack([s0, s1]), np.stack([e0, e1])), version_2_with_negative=True,
                                     output_dir=str(tmp_path))
    assert out == {"x": "ee ff"}
    assert json.loads((tmp_path / "null_odds.json").read_text())["x"] == pytest.approx(2.0 - 6.0)


def test_prefix_names_the_files(tmp_path):
    _single(_set(), version_2_with_negative=True, output_dir=str(tmp_path), prefix="predict")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "predict_nbest_predictions.json", "predict_null_odds.json", "predict_predictions.json"]


def test_logits_must_match_features():
    with pytest.raises(ValueError, match="features"):
        postprocess_qa_predictions([{"id": "x", "context": CONTEXT}], [{"example_id": "x", "offset_mapping": []}],
                                   (np.zeros((2, 4)), np.zeros((2, 4))))


# ----------------------------------------------------------------------------------------------------
# Windows and labels with the tiny tokenizer
# ----------------------------------------------------------------------------------------------------
def test_answer_token_span_on_hand_built_offsets():
    offsets = [(0, 0), (0, 4), (0, 0), (0, 3), (4, 6), (6, 8), (9, 12), (0, 0)]
    seq = [None, 0, None, 1, 1, 1, 1, None]
    assert answer_token_span(offsets, seq, 1, 4, 8) == (4, 5)   # a word split in two pieces
    assert answer_token_span(offsets, seq, 1, 0, 3) == (3, 3)
    assert answer_token_span(offsets, seq, 1, 9, 12) == (6, 6)
    assert answer_token_span(offsets, seq, 1, 9, 14) is None     # runs past the window
    assert answer_token_span(offsets, [None] * 8, 1, 0, 3) is None


EXAMPLES = {
    "id": ["e0", "e1"],
    "question": ["  what is the capital", "where is the cat"],
    "context": ["paris is the capital of france and london is the capital of england today",
                "the cat sat on the mat"],
    "answers": [{"text": ["london"], "answer_start": [35]}, {"text": [], "answer_start": []}],
}


def test_train_windows_label_the_answer_or_cls():
    tok = make_tokenizer()
    assert EXAMPLES["context"][0][35:41] == "london"
    feats = prepare_train_features(EXAMPLES, tok, max_seq_length=16, doc_stride=4)
    assert len(feats["input_ids"]) > 2  # the long context is split into several windows
    enc = tok(EXAMPLES["question"][0].lstrip(), EXAMPLES["context"][0], truncation="only_second", max_length=16,
              stride=4, return_overflowing_tokens=True, return_offsets_mapping=True)
    n0 = len(enc["input_ids"])
    found = 0
    for i in range(n0):
        s, e = feats["start_positions"][i], feats["end_positions"][i]
        tokens = tok.convert_ids_to_tokens(feats["input_ids"][i])
        if "london" in tokens and tokens.index("london") > tokens.index("[SEP]"):
            assert (s, e) == (tokens.index("london"), tokens.index("london"))
            off = enc["offset_mapping"][i]
            assert EXAMPLES["context"][0][off[s][0]:off[e][1]] == "london"
            found += 1
        else:
            assert (s, e) == (0, 0)  # the CLS position
    assert found >= 1 and found < n0
    # the unanswerable question: every window points at CLS
    assert all(feats["start_positions"][i] == feats["end_positions"][i] == 0
               for i in range(n0, len(feats["input_ids"])))


def test_validation_windows_keep_only_context_offsets():
    tok = make_tokenizer()
    feats = prepare_validation_features(EXAMPLES, tok, max_seq_length=16, doc_stride=4)
    assert feats["example_id"][0] == "e0" and feats["example_id"][-1] == "e1"
    assert len(feats["example_id"]) == len(feats["input_ids"])
    for i, offsets in enumerate(feats["offset_mapping"]):
        seq = feats.sequence_ids(i)
        assert [o is not None for o in offsets] == [s == 1 for s in seq]
    ctx = EXAMPLES["context"][0]
    texts = {ctx[o[0]:o[1]] for i, ex in enumerate(feats["example_id"]) if ex == "e0"
             for o in feats["offset_mapping"][i] if o is not None}
    assert "london" in texts and "paris" in texts and "what" not in texts


# ----------------------------------------------------------------------------------------------------
# Local files
# ----------------------------------------------------------------------------------------------------
FLAT = {"id": "q1", "title": "t", "context": "the cat sat", "question": "who sat",
        "answers": {"text": ["the cat"], "answer_start": [0]}}


def test_load_official_nested_squad(tmp_path):
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "Cats", "paragraphs": [{
        "context": "the cat sat", "qas": [
            {"id": "q1", "question": "who sat", "answers": [{"text": "the cat", "answer_start": 0},
                                                            {"text": "cat", "answer_start": 4}]},
            {"id": "q2", "question": "who ran", "is_impossible": True, "answers": [],
             "plausible_answers": [{"text": "cat", "answer_start": 4}]}]}]}]}))
    records, has_answers = load_squad_file(path)
    assert has_answers
    assert records == [
        {"id": "q1", "title": "Cats", "context": "the cat sat", "question": "who sat",
         "answers": {"text": ["the cat", "cat"], "answer_start": [0, 4]}},
        {"id": "q2", "title": "Cats", "context": "the cat sat", "question": "who ran",
         "answers": {"text": [], "answer_start": []}},
    ]


def test_load_flat_json_jsonl_and_csv(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": [FLAT]}))
    (tmp_path / "b.jsonl").write_text(json.dumps(FLAT) + "\n")
    (tmp_path / "c.csv").write_text('id,title,context,question,answers\nq1,t,the cat sat,who sat,'
                                    '"{""text"": [""the cat""], ""answer_start"": [0]}"\n')
    for name in ("a.json", "b.jsonl", "c.csv"):
        assert load_squad_file(tmp_path / name) == ([FLAT], True), name


def test_load_file_without_answers(tmp_path):
    (tmp_path / "test.json").write_text(json.dumps({"data": [{"context": "the cat", "question": "who"}]}))
    records, has_answers = load_squad_file(tmp_path / "test.json")
    assert not has_answers
    assert records[0]["id"] == "0" and records[0]["answers"] == {"text": [], "answer_start": []}


def test_load_rejects_inconsistent_answers(tmp_path):
    bad = dict(FLAT, answers={"text": ["a", "b"], "answer_start": [0]})
    (tmp_path / "bad.json").write_text(json.dumps({"data": [bad]}))
    with pytest.raises(ValueError, match="answer_start"):
        load_squad_file(tmp_path / "bad.json")


def test_long_questions_are_cut_to_leave_room_for_the_stride():
    # 40 question tokens do not fit 32-token windows with an 8-token stride: the question is cut to
    # 32 - 3 special tokens - 8 - 1 = 20 tokens, every window keeps 9 context tokens, and the answer is labelled.
    tok = make_tokenizer()
    context = "the dog sat on the mat today and then it ran to the city of paris in france"
    examples = {"id": ["a"], "question": [" ".join(["cat"] * 40)], "context": [context],
                "answers": [{"text": ["paris"], "answer_start": [context.index("paris")]}]}
    feats = prepare_train_features(examples, tok, max_seq_length=32, doc_stride=8)
    assert all(len(ids) == 32 and tok.convert_ids_to_tokens(ids).count("cat") == 20 for ids in feats["input_ids"][:-1])
    labelled = [i for i, s in enumerate(feats["start_positions"]) if s != 0]
    assert labelled and all(tok.convert_ids_to_tokens(feats["input_ids"][i])[feats["start_positions"][i]] == "paris"
                            for i in labelled)
    with pytest.raises(ValueError, match="doc_stride"):
        prepare_train_features(examples, tok, max_seq_length=16, doc_stride=12)
