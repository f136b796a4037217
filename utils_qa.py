"""Question-answering helpers for ``run_qa.py`` (SQuAD v1.1 / v2.0), in reading order:

1. local data        ``load_squad_file``: flat or official nested SQuAD json, json lines, csv -> records
2. features          ``prepare_train_features`` / ``prepare_validation_features``: question + context tokenised
                     into overlapping windows (``max_seq_length``, ``doc_stride``); training labels are token
                     positions, evaluation features keep character offsets of the context tokens only
3. post-processing   ``postprocess_qa_predictions``: start/end logits of all the windows of an example -> the
                     answer text in the original context (n-best, ``max_answer_length``, null answer for v2),
                     written to ``predictions.json``, ``nbest_predictions.json`` and ``null_odds.json``
4. SQuAD metric      ``normalize_answer``, ``exact_match_score``, ``f1_score`` (official v1.1 definitions),
                     ``compute_exact``, ``compute_f1`` (official v2.0), ``squad_evaluate`` (both, with the v2.0
                     HasAns / NoAns split). Offline: no ``evaluate.load``.

Nothing here imports torch; logits are numpy arrays.
"""
import ast
import collections
import csv
import json
import logging
import os
import re
import string
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "load_squad_file", "answer_token_span", "prepare_train_features", "prepare_validation_features",
    "postprocess_qa_predictions", "normalize_answer", "exact_match_score", "f1_score", "compute_exact",
    "compute_f1", "squad_evaluate", "references_from_examples",
]


# ----------------------------------------------------------------------------------------------------
# 1. Local data
# ----------------------------------------------------------------------------------------------------
def _answers_of(raw, where):
    """``{"text": [...], "answer_start": [...]}`` from a dict of lists, a list of dicts, a JSON string or None."""
    if raw is None or raw == "":
        return {"text": [], "answer_start": []}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            try:
                raw = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                raise ValueError(f"{where}: cannot parse answers {raw[:80]!r}; expected JSON like "
                                 '{"text": ["paris"], "answer_start": [0]}') from None
    if isinstance(raw, list):  # official SQuAD: [{"text": ..., "answer_start": ...}, ...]
        raw = {"text": [a["text"] for a in raw], "answer_start": [a["answer_start"] for a in raw]}
    if not isinstance(raw, dict) or "text" not in raw or "answer_start" not in raw:
        raise ValueError(f"{where}: answers must have 'text' and 'answer_start', got {raw!r}")
    texts, starts = list(raw["text"]), list(raw["answer_start"])
    if len(texts) != len(starts):
        raise ValueError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values")
    return {"text": [str(t) for t in texts], "answer_start": [int(s) for s in starts]}


def _flatten_official(data, path):
    """Official nested SQuAD (data -> paragraphs -> qas) to flat records."""
    records = []
    for article in data:
        title = article.get("title", "")
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = [] if qa.get("is_impossible", False) else qa.get("answers", [])
                records.append({"id": str(qa["id"]), "title": title, "context": context, "question": qa["question"],
                                "answers": _answers_of(answers, f"{path} question {qa['id']}")})
    return records


def load_squad_file(path):
    """Read a local SQuAD-format file into a list of records and whether it has answers.

    Accepted: ``.json`` with ``{"data": [...]}`` holding either flat records (``id, title, context, question,
    answers{text, answer_start}``, the layout of the Hub's ``squad``) or the official nested SQuAD layout
    (``data -> paragraphs -> qas``; ``is_impossible`` questions get no answers); a json list of flat records;
    json lines (``.json``/``.jsonl``); ``.csv`` with the flat columns, ``answers`` as a JSON string.
    Missing ``id`` become ``"<row index>"``, missing ``title`` ``""``.

    :return: ``(records, has_answers)``; ``has_answers`` is False when no record carries an ``answers`` field
             (a test file to predict on), in which case every record gets empty answers.
    """
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        text = path.read_text(encoding="utf-8")
        try:
            obj = json.loads(text) if path.suffix != ".jsonl" else None
        except json.JSONDecodeError:
            obj = None
        if obj is None or (isinstance(obj, dict) and "data" not in obj and "context" in obj):  # json lines
            obj = [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(obj, dict):
            if "data" not in obj:
                raise ValueError(f"{path}: a SQuAD json object needs a 'data' field")
            obj = obj["data"]
        if obj and isinstance(obj[0], dict) and "paragraphs" in obj[0]:
            return _flatten_official(obj, path), True
        rows = obj
    has_answers = any("answers" in r for r in rows)
    records = []
    for i, r in enumerate(rows):
        for key in ("context", "question"):
            if key not in r:
                raise ValueError(f"{path} record {i}: missing '{key}'")
        records.append({"id": str(r.get("id", i)), "title": r.get("title") or "", "context": r["context"],
                        "question": r["question"], "answers": _answers_of(r.get("answers"), f"{path} record {i}")})
    return records, has_answers


# ----------------------------------------------------------------------------------------------------
# 2. Features
# ----------------------------------------------------------------------------------------------------
def answer_token_span(offsets, sequence_ids, context_id, start_char, end_char):
    """Token positions ``(start, end)`` of the answer characters ``[start_char, end_char)`` in one window.

    ``offsets`` are the tokenizer's (char_start, char_end) per token, ``sequence_ids`` tell which tokens belong
    to the context (``== context_id``). Returns None when the answer is not entirely inside the context part of
    this window (the feature is then labelled with the CLS position).
    """
    ctx = [k for k, s in enumerate(sequence_ids) if s == context_id]
    if not ctx:
        return None
    first, last = ctx[0], ctx[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None
    start = first
    while start + 1 <= last and offsets[start + 1][0] <= start_char:
        start += 1
    end = last
    while end - 1 >= start and offsets[end - 1][1] >= end_char:
        end -= 1
    return start, end


def _truncate_questions(questions, tokenizer, max_seq_length, doc_stride):
    """Cut questions so that each window keeps more than ``doc_stride`` context tokens.

    Otherwise the fast tokenizer cannot make overlapping windows (it panics on ``stride >= max_len``).
    """
    max_question = max_seq_length - tokenizer.num_special_tokens_to_add(pair=True) - doc_stride - 1
    if max_question < 1:
        raise ValueError(f"max_seq_length {max_seq_length} leaves no room for a question next to doc_stride "
                         f"{doc_stride} context tokens: raise --max_seq_length or lower --doc_stride")
    offsets = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = 0
    for i, offs in enumerate(offsets):
        if len(offs) > max_question:
            questions[i] = questions[i][:offs[max_question - 1][1]]
            cut += 1
    if cut:
        logger.warning("%d question(s) longer than %d tokens were truncated (max_seq_length %d, doc_stride %d)",
                       cut, max_question, max_seq_length, doc_stride)
    return questions


def _tokenize(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length, question_column, context_column):
    pad_on_right = tokenizer.padding_side == "right"
    # Leading whitespace in questions only eats the window budget.
    questions = [q.lstrip() for q in examples[question_column]]
    questions = _truncate_questions(questions, tokenizer, max_seq_length, doc_stride)
    contexts = examples[context_column]
    enc = tokenizer(
        questions if pad_on_right else contexts,
        contexts if pad_on_right else questions,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length" if pad_to_max_length else False,
    )
    return enc, (1 if pad_on_right else 0)


def prepare_train_features(examples, tokenizer, max_seq_length=384, doc_stride=128, pad_to_max_length=False,
                           question_column="question", context_column="context", answer_column="answers"):
    """Tokenise a batch of examples into windows labelled with ``start_positions`` / ``end_positions``.

    A long context gives several windows overlapping by ``doc_stride`` tokens. A window that does not contain
    the whole (first) gold answer, and every window of an unanswerable question, is labelled with the position
    of the CLS token. For ``datasets.Dataset.map(batched=True)``.
    """
    enc, context_id = _tokenize(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length,
                                question_column, context_column)
    sample_mapping = enc.pop("overflow_to_sample_mapping")
    offset_mapping = enc.pop("offset_mapping")
    enc["start_positions"], enc["end_positions"] = [], []
    for i, offsets in enumerate(offset_mapping):
        input_ids = enc["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        answers = examples[answer_column][sample_mapping[i]]
        span = None
        if len(answers["answer_start"]) > 0:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            span = answer_token_span(offsets, enc.sequence_ids(i), context_id, start_char, end_char)
        start, end = span if span is not None else (cls_index, cls_index)
        enc["start_positions"].append(start)
        enc["end_positions"].append(end)
    return enc


def prepare_validation_features(examples, tokenizer, max_seq_length=384, doc_stride=128, pad_to_max_length=False,
                                question_column="question", context_column="context", id_column="id"):
    """Tokenise a batch of examples into windows carrying ``example_id`` and ``offset_mapping``.

    Offsets of tokens outside the context (question, special tokens, padding) are set to None, so that
    post-processing can never pick them.
    """
    enc, context_id = _tokenize(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length,
                                question_column, context_column)
    sample_mapping = enc.pop("overflow_to_sample_mapping")
    enc["example_id"] = []
    for i in range(len(enc["input_ids"])):
        sequence_ids = enc.sequence_ids(i)
        enc["example_id"].append(examples[id_column][sample_mapping[i]])
        enc["offset_mapping"][i] = [tuple(o) if sequence_ids[k] == context_id else None
                                    for k, o in enumerate(enc["offset_mapping"][i])]
    return enc


# ----------------------------------------------------------------------------------------------------
# 3. Post-processing
# ----------------------------------------------------------------------------------------------------
def _column(data, name):
    """One column as a list, from a ``datasets.Dataset`` or a list of dicts."""
    if hasattr(data, "column_names"):
        return list(data[name])
    return [row[name] for row in data]


def _write_json(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=4) + "\n")


def postprocess_qa_predictions(examples, features, predictions, version_2_with_negative=False, n_best_size=20,
                               max_answer_length=30, null_score_diff_threshold=0.0, output_dir=None, prefix=None,
                               log_level=logging.WARNING):
    """Map start/end logits of the features (windows) back to an answer text per example.

    :param examples:    the raw examples (``id``, ``context``): a ``datasets.Dataset`` or a list of dicts.
    :param features:    the windows (``example_id``, ``offset_mapping`` with None outside the context), in the
                        order of the logits.
    :param predictions: ``(start_logits, end_logits)``, arrays of shape ``(num_features, seq_len)``; positions past
                        a window's length (padding, e.g. filled with -100) are ignored.
    :param version_2_with_negative: also consider the null answer: its score is the smallest, over the windows
                        of the example, of ``start_logits[0] + end_logits[0]`` (the CLS position); the prediction
                        is ``""`` when ``null_score - best_span_score > null_score_diff_threshold``.
    :param n_best_size: the top ``n_best_size`` start and end positions of each window are paired; the
                        ``n_best_size`` best spans of the example are kept (``nbest_predictions.json``).
    :param max_answer_length: spans longer than this many tokens, or with end < start, are discarded.
    :param output_dir:  write ``predictions.json``, ``nbest_predictions.json`` and, for v2, ``null_odds.json``
                        (each ``<prefix>_``-prefixed when ``prefix`` is given) there.
    :return: ``{example_id: answer_text}`` in the order of ``examples``.

    Spans found in two overlapping windows at the same character offsets are counted once, with the higher
    score. When no span is valid the prediction is ``""`` (and the null odds ``Infinity``).
    """
    logger.setLevel(log_level)
    if len(predictions) != 2:
        raise ValueError("predictions must be (start_logits, end_logits)")
    all_start_logits, all_end_logits = predictions
    example_ids = _column(features, "example_id")
    if len(all_start_logits) != len(example_ids) or len(all_end_logits) != len(example_ids):
        raise ValueError(f"got {len(all_start_logits)} start / {len(all_end_logits)} end logits for "
                         f"{len(example_ids)} features")
    offset_mappings = _column(features, "offset_mapping")
    ids, contexts = _column(examples, "id"), _column(examples, "context")
    features_per_example = collections.defaultdict(list)
    for i, ex_id in enumerate(example_ids):
        features_per_example[ex_id].append(i)
    logger.info("Post-processing %d example predictions split into %d features.", len(ids), len(example_ids))

    all_predictions = collections.OrderedDict()
    all_nbest = collections.OrderedDict()
    null_odds = collections.OrderedDict()
    for ex_id, context in zip(ids, contexts):
        null = None
        spans = {}  # (char_start, char_end) -> candidate
        for fi in features_per_example.get(ex_id, []):
            start_logits = np.asarray(all_start_logits[fi], dtype=np.float64)
            end_logits = np.asarray(all_end_logits[fi], dtype=np.float64)
            offsets = offset_mappings[fi]
            feature_null = start_logits[0] + end_logits[0]
            if null is None or feature_null < null["score"]:
                null = {"offsets": (0, 0), "score": feature_null, "start_logit": start_logits[0],
                        "end_logit": end_logits[0]}
            # Ties are broken towards the earlier position (stable sort), so results are reproducible.
            start_indexes = np.argsort(-start_logits, kind="stable")[:n_best_size].tolist()
            end_indexes = np.argsort(-end_logits, kind="stable")[:n_best_size].tolist()
            for s in start_indexes:
                for e in end_indexes:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue  # outside the window, or not a context token
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    key = (int(offsets[s][0]), int(offsets[e][1]))
                    score = start_logits[s] + end_logits[e]
                    if key not in spans or score > spans[key]["score"]:
                        spans[key] = {"offsets": key, "score": score, "start_logit": start_logits[s],
                                      "end_logit": end_logits[e]}
        ranked = sorted(spans.values(), key=lambda c: c["score"], reverse=True)[:n_best_size]
        nbest = list(ranked)
        if version_2_with_negative and null is not None:
            nbest = sorted(ranked + [null], key=lambda c: c["score"], reverse=True)[:n_best_size]
            if not any(c is null for c in nbest):  # always report the null answer
                nbest.append(null)

        scores = np.array([c["score"] for c in nbest], dtype=np.float64)
        probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum() if len(scores) else scores
        all_nbest[ex_id] = [{"text": context[c["offsets"][0]:c["offsets"][1]], "probability": float(p),
                             "start_logit": float(c["start_logit"]), "end_logit": float(c["end_logit"]),
                             "offsets": [int(c["offsets"][0]), int(c["offsets"][1])]}
                            for c, p in zip(nbest, probs)]

        best = ranked[0] if ranked else None
        best_text = context[best["offsets"][0]:best["offsets"][1]] if best is not None else ""
        if not version_2_with_negative:
            all_predictions[ex_id] = best_text
        else:
            if null is None:
                score_diff = float("inf")
            else:
                score_diff = float("inf") if best is None else float(null["score"] - best["score"])
            null_odds[ex_id] = score_diff
            all_predictions[ex_id] = "" if score_diff > null_score_diff_threshold else best_text

    if output_dir is not None:
        if not os.path.isdir(output_dir):
            raise NotADirectoryError(f"{output_dir} is not a directory")
        name = (lambda n: n) if prefix is None else (lambda n: f"{prefix}_{n}")
        _write_json(all_predictions, os.path.join(output_dir, name("predictions.json")))
        _write_json(all_nbest, os.path.join(output_dir, name("nbest_predictions.json")))
        if version_2_with_negative:
            _write_json(null_odds, os.path.join(output_dir, name("null_odds.json")))
        logger.info("Saved predictions to %s", output_dir)
    return all_predictions


# ----------------------------------------------------------------------------------------------------
# 4. SQuAD metric: the official v1.1 and v2.0 evaluation scripts, offline
# ----------------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s):
    """Lower-case, remove punctuation, remove the articles a/an/the, collapse whitespace (official)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction, ground_truth):
    """SQuAD v1.1: 1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction, ground_truth):
    """SQuAD v1.1 token F1 of the normalised strings (bag of tokens); 0 when they share no token."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _token_f1(pred_tokens, gold_tokens):
    num_same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def compute_exact(a_gold, a_pred):
    """SQuAD v2.0 exact match (same as v1.1)."""
    return float(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold, a_pred):
    """SQuAD v2.0 token F1: like v1.1, but when either side is empty it is 1 if both are empty, else 0."""
    gold_toks = normalize_answer(a_gold).split() if a_gold else []
    pred_toks = normalize_answer(a_pred).split() if a_pred else []
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return float(gold_toks == pred_toks)
    return _token_f1(pred_toks, gold_toks)


def _missing(predictions, references):
    missing = [q for q in references if q not in predictions]
    if missing:
        logger.warning("%d questions have no prediction and score 0 (e.g. %s)", len(missing), missing[:3])
    return missing


def _squad_v1(predictions, references):
    em = f1 = 0.0
    _missing(predictions, references)
    for qid, golds in references.items():
        if not golds:
            raise ValueError(f"question {qid!r} has no gold answer: SQuAD v1.1 needs one "
                             "(use --version_2_with_negative for unanswerable questions)")
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em += max(exact_match_score(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    total = len(references)
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total, "total": total}


def _squad_v2(predictions, references):
    _missing(predictions, references)
    exact, f1, has_ans = {}, {}, {}
    for qid, golds in references.items():
        has_ans[qid] = bool(golds)
        if qid not in predictions:
            exact[qid] = f1[qid] = 0.0
            continue
        gold_answers = [a for a in golds if normalize_answer(a)] or [""]
        pred = predictions[qid]
        exact[qid] = max(compute_exact(a, pred) for a in gold_answers)
        f1[qid] = max(compute_f1(a, pred) for a in gold_answers)

    def summary(qids):
        n = len(qids)
        return (100.0 * sum(exact[q] for q in qids) / n, 100.0 * sum(f1[q] for q in qids) / n, n)

    total_exact, total_f1, total = summary(list(references))
    out = {"exact": total_exact, "exact_match": total_exact, "f1": total_f1, "total": total}
    for name, flag in (("HasAns", True), ("NoAns", False)):
        qids = [q for q in references if has_ans[q] == flag]
        if qids:
            e, f, n = summary(qids)
            out.update({f"{name}_exact": e, f"{name}_f1": f, f"{name}_total": n})
    return out


def squad_evaluate(predictions, references, version_2_with_negative=False):
    """The official SQuAD evaluation, in percent.

    :param predictions: ``{id: predicted_text}`` (``""`` = no answer, for v2).
    :param references:  ``{id: [gold_text, ...]}`` (an empty list = unanswerable, for v2); ``total`` counts these
                        ids, and an id without prediction scores 0.
    :return: v1.1: ``exact_match``, ``f1``, ``total`` (max over the gold answers, averaged over questions).
             v2.0: ``exact`` (also as ``exact_match``), ``f1``, ``total`` and ``HasAns_exact/_f1/_total``,
             ``NoAns_exact/_f1/_total`` (v2.0 rules: golds that normalise to ``""`` are dropped and an
             unanswerable question has the single gold ``""``).
    """
    if not references:
        raise ValueError("no references to evaluate")
    if version_2_with_negative:
        return _squad_v2(predictions, references)
    return _squad_v1(predictions, references)


def references_from_examples(examples, answer_column="answers", id_column="id"):
    """``{id: [gold_text, ...]}`` from raw examples (a ``datasets.Dataset`` or a list of dicts)."""
    return {str(i): list(a["text"]) for i, a in zip(_column(examples, id_column), _column(examples, answer_column))}
