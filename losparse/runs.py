"""Safe runs for the example scripts: start-up checks of every path a run needs (``check_run_paths``), atomic
checkpoint folders (``save_state_atomic``, ``latest_checkpoint``) and one-line errors (``one_line_errors``)."""
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .checkpoint import CheckpointFileError, checkpoint_file_problem
from .common import logger


class RunInputError(ValueError):
    """A flag or an input file that a run cannot use, found before the long work starts. The message is one line
    that names the flag or the file; :func:`one_line_errors` turns it into ``prog: error: ...`` and exit 2."""


CHECKPOINT_MARKER = "losparse_checkpoint.json"  # written last into a checkpoint folder: the folder is complete
_INCOMPLETE_SUFFIX = ".incomplete"  # a checkpoint folder being written (renamed to its name when complete)
_LAST_CHECKPOINT = {}  # the last folder save_state_atomic completed in this process (for the Ctrl-C message)


def check_output_dir(path, flag="--output_dir"):
    """Create ``path`` (with its parents) and write and remove a file in it, so that a run that cannot save stops
    at start-up rather than after training. Raises :class:`RunInputError` naming ``flag``."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".losparse-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise RunInputError(f"{flag} {path}: cannot be created or written ({e.strerror or e})") from None


def check_checkpoint_file(path, flag):
    """Stop with one line if ``path`` (a checkpoint file, or a folder holding ``pytorch_model.bin`` /
    ``model.safetensors``) is missing, truncated or not a checkpoint. Reads only headers: call it at start-up."""
    p = Path(path)
    if p.is_dir():
        found = [p / c for c in ("pytorch_model.bin", "model.safetensors", "losparse_model.safetensors")
                 if (p / c).is_file()]
        if not found:
            raise RunInputError(f"{flag} {path}: no pytorch_model.bin or model.safetensors in this folder")
        p = found[0]
    if not p.is_file():
        raise RunInputError(f"{flag} {path}: no such file")
    problem = checkpoint_file_problem(p)
    if problem is not None:
        raise RunInputError(f"{flag} {p}: truncated or not a checkpoint ({p.stat().st_size} bytes; {problem})")


def check_data_file(path, flag):
    """Stop with one line if the local data file ``path`` has no examples: empty, only a csv/tsv header, an empty
    json list, or (``.txt``) only whitespace. Reads up to the first example."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            if ext in ("csv", "tsv"):
                header = f.readline()
                empty = not header.strip() or not any(line.strip() for line in f)
                what = "no rows after the header" if header.strip() else "an empty file"
            else:
                text = ""
                while not text.strip():
                    chunk = f.read(1 << 16)
                    if not chunk:
                        break
                    text += chunk
                text = text.lstrip()
                empty = not text or (ext in ("json", "jsonl") and text[:1] == "[" and text[1:].lstrip()[:1] == "]")
                what = "an empty file" if not text else "an empty list"
    except OSError as e:
        raise RunInputError(f"{flag} {path}: cannot be read ({e.strerror or e})") from None
    if empty:
        raise RunInputError(f"{flag} {path}: no examples ({what})")


def checkpoint_problem(folder):
    """Why ``folder`` is not a complete checkpoint written by :func:`save_state_atomic`, or None."""
    marker = os.path.join(folder, CHECKPOINT_MARKER)
    if not os.path.isfile(marker):
        missing = _legacy_checkpoint_missing(folder)
        if not missing:  # written by a plain save_state (earlier versions): taken, with a warning
            logger.warning(f"checkpoint {folder}: no {CHECKPOINT_MARKER} (written before checkpoints were atomic); "
                           "its files look complete, so it is used")
            return None
        return (f"no {CHECKPOINT_MARKER} (interrupted while it was written, or not written by save_state_atomic) "
                f"and not a complete checkpoint of an earlier version (no {' / '.join(missing)})")
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {CHECKPOINT_MARKER} ({e})"
    for name, size in files.items():
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        if os.path.getsize(p) != size:
            return f"{name} has {os.path.getsize(p)} bytes, {size} were written"
    return None


def _legacy_checkpoint_missing(folder):
    """What a checkpoint folder written by a plain ``accelerator.save_state`` (before :func:`save_state_atomic`)
    lacks of a finished write: the model, the optimizer, the random states and the first registered object
    (written in that order; the scripts register at least one)."""
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    wanted = [("model.safetensors", "pytorch_model.bin"), ("optimizer.bin",), ("random_states_0.pkl",),
              ("custom_checkpoint_0.pkl",)]
    return [w[0] for w in wanted if not names.intersection(w)]


def _completed_at(folder):
    marker = os.path.join(folder, CHECKPOINT_MARKER)
    return os.path.getmtime(marker if os.path.isfile(marker) else folder)


def latest_checkpoint(output_dir, name_pattern=r"^(step|epoch)_(\d+)$"):
    """The most recently completed checkpoint folder of ``output_dir`` whose name matches ``name_pattern``, or
    None. Incomplete folders (a run stopped while writing them) are skipped, each with a warning."""
    if not os.path.isdir(output_dir):
        return None
    pattern, found = re.compile(name_pattern), []
    for entry in sorted(os.scandir(output_dir), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        if entry.name.endswith(_INCOMPLETE_SUFFIX) and pattern.match(entry.name[: -len(_INCOMPLETE_SUFFIX)]):
            logger.warning(f"latest checkpoint: skipping {entry.path}: its write did not finish")
        elif pattern.match(entry.name):
            problem = checkpoint_problem(entry.path)
            if problem is None:
                found.append(entry.path)
            else:
                logger.warning(f"latest checkpoint: skipping {entry.path}: {problem}")
    return max(found, key=_completed_at) if found else None


def check_resume_folder(folder, flag="--resume_from_checkpoint"):
    """Stop with one line if ``folder`` is not a complete checkpoint (see :func:`checkpoint_problem`)."""
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise RunInputError(f"{flag} {folder}: not a complete checkpoint: {problem}")


def check_run_paths(args):
    """The start-up checks of the example scripts, in seconds, before any model is loaded: every local data file
    (``--train_file``, ``--validation_file``, ``--test_file``) has examples; ``--eval_checkpoint`` and
    ``--stored_model_path`` are whole checkpoint files; a ``--resume_from_checkpoint`` folder is complete; and
    ``--output_dir`` (or, without it, the current directory that ``--checkpointing_steps`` writes to) can be
    created and written. Raises :class:`RunInputError` naming the flag."""
    for name in ("train_file", "validation_file", "test_file"):
        if getattr(args, name, None) is not None:
            check_data_file(getattr(args, name), f"--{name}")
    for name in ("eval_checkpoint", "stored_model_path"):
        if getattr(args, name, None) is not None:
            check_checkpoint_file(getattr(args, name), f"--{name}")
    resume = getattr(args, "resume_from_checkpoint", None)
    if resume is not None and resume != "latest":
        check_resume_folder(resume)
    if getattr(args, "output_dir", None) is not None:
        check_output_dir(args.output_dir)
    elif getattr(args, "checkpointing_steps", None) is not None:  # step_N / epoch_N folders in the current directory
        check_output_dir(os.getcwd(), "--checkpointing_steps (without --output_dir, the current directory)")


def save_state_atomic(accelerator, output_dir):
    """``accelerator.save_state(output_dir)`` such that a folder named ``output_dir`` is always complete.

    Everything (the model, optimizer, scheduler, sampler and random states, and every object registered with
    ``accelerator.register_for_checkpointing``, e.g. the :class:`Pruner`) is written to
    ``output_dir + ".incomplete"``; then a :data:`CHECKPOINT_MARKER` listing the files and their sizes; then the
    folder is renamed. A run stopped (Ctrl-C, a kill, a full disk) before the rename leaves the previous
    checkpoints usable, and :func:`latest_checkpoint` skips the unfinished folder. Call it on every process.
    """
    output_dir = os.path.normpath(output_dir)
    tmp = output_dir + _INCOMPLETE_SUFFIX
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)  # left by a run that was stopped while writing it
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish_checkpoint(tmp, output_dir)
    accelerator.wait_for_everyone()
    _LAST_CHECKPOINT["path"] = output_dir
    return output_dir


def _finish_checkpoint(tmp, output_dir):
    files = {}
    for root, _, names in os.walk(tmp):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, tmp)] = os.path.getsize(p)
    for p in [os.path.join(tmp, f) for f in files] + [tmp]:  # on disk before the marker says so
        _fsync(p)
    with open(os.path.join(tmp, CHECKPOINT_MARKER), "w") as f:
        json.dump({"files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    old = None
    if os.path.exists(output_dir):  # the same name written again (e.g. epoch_N after a resume): replace it
        old = output_dir + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(output_dir, old)
    os.rename(tmp, output_dir)
    _fsync(os.path.dirname(os.path.abspath(output_dir)))
    if old is not None:
        shutil.rmtree(old)


def _fsync(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. directories on some file systems
    finally:
        os.close(fd)


@contextlib.contextmanager
def one_line_errors(prog):
    """Around a script's ``main()``: a :class:`RunInputError` or :class:`CheckpointFileError` ends the process
    with ``prog: error: <message>`` (exit 2, no traceback); Ctrl-C with one line saying which checkpoint is the
    last complete one (exit 130)."""
    try:
        yield
    except (RunInputError, CheckpointFileError) as e:
        _close_progress_bars()
        sys.stderr.write(f"{prog}: error: {e}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        _close_progress_bars()
        last = _LAST_CHECKPOINT.get("path")
        where = f"the last complete checkpoint is {last} (--resume_from_checkpoint latest continues from it)" \
            if last else "no checkpoint was completed in this run"
        sys.stderr.write(f"\n{prog}: interrupted; {where}\n")
        raise SystemExit(130) from None


def _close_progress_bars():
    """Close the open tqdm bars now, so that they do not print after the last line (when they are collected)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()
    sys.stderr.flush()
