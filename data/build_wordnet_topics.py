"""Build ``data/wordnet_topics``: a small topic-classification set made of WordNet 3.0 noun glosses.

Each example is the definition part of one WordNet noun synset's gloss (``sentence1``) and the
lexicographer file the synset belongs to (``label``, e.g. ``noun.animal``). The output is
deterministic: the same WordNet files give byte-identical ``train.csv``, ``validation.csv`` and
``LICENSE`` on every run and every platform (sampling is by SHA-256 of ``seed:label:offset``, not by
``random``).

    apt-get install -y wordnet-base          # Debian/Ubuntu: WordNet 3.0 database in /usr/share/wordnet
    python data/build_wordnet_topics.py      # writes data/wordnet_topics/{train,validation}.csv, LICENSE

``--dict-dir`` points at another WordNet 3.0 ``dict`` directory (the one holding ``data.noun``).
"""
import argparse
import csv
import hashlib
import logging
import re
import sys
from collections import defaultdict
from pathlib import Path

logger = logging.getLogger("build_wordnet_topics")

DEFAULT_DICT_DIR = "/usr/share/wordnet"
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "wordnet_topics"

# sha256 of data.noun in Debian's wordnet-base 1:3.0-37, the file the committed csv files were built from.
DEBIAN_DATA_NOUN_SHA256 = "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2"

# WordNet 3.0 lexicographer file numbers of the noun files (the `lexnames` file, which Debian does not ship).
NOUN_LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute",
    8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling",
    13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object",
    18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process",
    23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance",
    28: "noun.time",
}
DEFAULT_CLASSES = (
    "noun.animal", "noun.artifact", "noun.body", "noun.food",
    "noun.location", "noun.person", "noun.plant", "noun.substance",
)
MIN_WORDS, MAX_WORDS = 4, 40


def clean_gloss(gloss):
    """The definition part of a gloss: drop the quoted example sentences that follow it, squeeze spaces."""
    definition = gloss.split('; "', 1)[0]
    definition = re.sub(r"\s+", " ", definition).strip().rstrip(";").strip()
    return "" if definition.startswith('"') else definition


def read_noun_glosses(data_noun):
    """Yield ``(offset, lexname, definition)`` for every synset line of a WordNet ``data.noun`` file."""
    with open(data_noun, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" ", 3)
            if len(fields) < 4 or " | " not in line:
                continue
            lexname = NOUN_LEXNAMES.get(int(fields[1]))
            if lexname is None:
                raise ValueError(f"unknown noun lexicographer file number {fields[1]!r} in {data_noun}")
            yield fields[0], lexname, clean_gloss(line.split(" | ", 1)[1])


def read_licence(data_noun):
    """The WordNet 3.0 licence text, as carried in the header lines of ``data.noun``."""
    lines = []
    with open(data_noun, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("  "):
                break
            # header lines are "  <n> <text>  "
            parts = line.rstrip().split(" ", 3)
            lines.append(parts[3] if len(parts) > 3 else "")
    if not any("WordNet 3.0 Copyright" in line for line in lines):
        raise ValueError(f"{data_noun} does not start with the WordNet 3.0 licence; is this WordNet 3.0?")
    return "\n".join(lines).strip() + "\n"


def _key(*parts):
    return hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def build(dict_dir, classes=DEFAULT_CLASSES, train_per_class=500, validation_per_class=100, seed=42):
    """Return ``(train_rows, validation_rows, licence_text, counts)``; rows are ``(sentence1, label)``."""
    data_noun = Path(dict_dir) / "data.noun"
    if not data_noun.is_file():
        raise FileNotFoundError(
            f"WordNet data file {data_noun} not found. Install the WordNet 3.0 database "
            f"(Debian/Ubuntu: `apt-get install -y wordnet-base`, which puts it in {DEFAULT_DICT_DIR}) "
            "or pass --dict-dir DIR, the WordNet `dict` directory that holds data.noun."
        )
    digest = hashlib.sha256(data_noun.read_bytes()).hexdigest()
    if digest != DEBIAN_DATA_NOUN_SHA256:
        logger.warning("%s has sha256 %s, not that of Debian wordnet-base 1:3.0-37 (%s); "
                       "the output will differ from the committed files", data_noun, digest, DEBIAN_DATA_NOUN_SHA256)
    unknown = set(classes) - set(NOUN_LEXNAMES.values())
    if unknown:
        raise ValueError(f"unknown classes {sorted(unknown)}; choose from {sorted(NOUN_LEXNAMES.values())}")

    # Group by case-folded text; a text seen under two different classes is ambiguous and dropped.
    by_text = {}
    for offset, lexname, text in read_noun_glosses(data_noun):
        if lexname not in classes or not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            continue
        by_text.setdefault(text.casefold(), []).append((offset, lexname, text))
    candidates = defaultdict(list)
    ambiguous = 0
    for entries in by_text.values():
        if len({lexname for _, lexname, _ in entries}) > 1:
            ambiguous += 1
            continue
        candidates[entries[0][1]].append(min(entries))  # lowest offset among same-class duplicates
    logger.info("dropped %d texts that occur under more than one class", ambiguous)

    need = train_per_class + validation_per_class
    train, validation, counts = [], [], {}
    for label in classes:
        pool = sorted(candidates[label], key=lambda e: _key(seed, label, e[0]))
        counts[label] = len(pool)
        if len(pool) < need:
            raise ValueError(f"class {label} has only {len(pool)} usable glosses, need {need}")
        validation += pool[:validation_per_class]
        train += pool[validation_per_class:need]

    def rows(entries, split):
        entries = sorted(entries, key=lambda e: _key(seed, split, e[0]))
        return [(text, lexname) for _, lexname, text in entries]

    return rows(train, "train"), rows(validation, "validation"), read_licence(data_noun), counts


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["sentence1", "label"])
        writer.writerows(rows)


LICENCE_PREAMBLE = (
    "The texts in train.csv and validation.csv are glosses taken from WordNet 3.0\n"
    "(Princeton University), via Debian's wordnet-base package; they are distributed here under\n"
    "the WordNet 3.0 licence below, copied from the header of WordNet's data.noun.\n"
    "Source: https://wordnet.princeton.edu/\n\n"
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dict-dir", default=DEFAULT_DICT_DIR,
                        help=f"WordNet 3.0 dict directory holding data.noun (default: {DEFAULT_DICT_DIR})")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR), help="where to write the csv files and LICENSE")
    parser.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                        help="comma-separated lexicographer files to use as labels")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--validation-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        train, validation, licence, counts = build(
            args.dict_dir, tuple(args.classes.split(",")), args.train_per_class, args.validation_per_class, args.seed)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "train.csv", train)
    write_csv(out / "validation.csv", validation)
    (out / "LICENSE").write_text(LICENCE_PREAMBLE + licence, encoding="utf-8")
    for label, n in counts.items():
        logger.info("%-16s %5d usable glosses", label, n)
    logger.info("wrote %d train and %d validation rows to %s", len(train), len(validation), out)


if __name__ == "__main__":
    main()
