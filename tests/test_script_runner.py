"""conftest.run_script: a run through the fork server (tests/_script_server.py) is what ``python script args`` gives:
exit code, stdout, stderr, argv, working directory, environment, ``__main__``, atexit, a killed run on timeout; an
environment a library reads at import falls back to a fresh interpreter."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import conftest
from conftest import run_script

SCRIPT = textwrap.dedent("""
    import atexit, json, os, sys
    import datasets, sklearn, torch
    atexit.register(lambda: print("atexit ran", file=sys.stderr))
    print("stderr line", file=sys.stderr)
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "name": __name__, "path0": sys.path[0],
                      "env": os.environ.get("RUNNER_PROBE"), "ppid": os.getppid(), "file": __file__,
                      "threads": torch.get_num_threads(), "cache": str(datasets.config.HF_DATASETS_CACHE),
                      "dl": str(datasets.config.DOWNLOADED_DATASETS_PATH), "grad": torch.is_grad_enabled(),
                      "kmp": {k: v for k, v in os.environ.items() if k.startswith("KMP_")}}))
    mode = sys.argv[1]
    if mode == "raise":
        raise ValueError("boom from the script")
    if mode == "exit_str":
        sys.exit("a message to stderr")
    if mode == "exit_int":
        sys.exit(3)
    if mode == "sleep":
        import time
        time.sleep(600)
""")

RAISE_LINE = 1 + [i for i, line in enumerate(SCRIPT.splitlines()) if "raise ValueError" in line][0]
pytestmark = pytest.mark.skipif(conftest._FORK_SERVER.disabled, reason="LOSPARSE_TEST_FORK=0 or no os.fork")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    return path


def _fresh(script, args, cwd, extra_env):
    env = conftest._script_env(os.environ, extra_env)
    return subprocess.run([sys.executable, str(script)] + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_fork_run_matches_a_fresh_interpreter(script, tmp_path):
    env = {"RUNNER_PROBE": "x y", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hfd")}
    forked = run_script(script, ["ok", "--flag", "a b"], cwd=tmp_path, extra_env=env)
    fresh = _fresh(script, ["ok", "--flag", "a b"], tmp_path, env)
    assert forked.returncode == fresh.returncode == 0
    assert forked.args == [sys.executable, str(script), "ok", "--flag", "a b"]
    a, b = json.loads(forked.stdout.splitlines()[0]), json.loads(fresh.stdout.splitlines()[0])
    assert a["ppid"] == conftest._FORK_SERVER.proc.pid  # it did run in the server's child
    assert b["ppid"] == os.getpid()
    for d in (a, b):
        d.pop("ppid")
    assert a == b
    assert a["cache"] == str(tmp_path / "hfd") and a["dl"] == str(tmp_path / "hfd" / "downloads")
    assert a["threads"] == 1 and a["name"] == "__main__" and a["path0"] == str(tmp_path)
    assert a["kmp"]  # scikit-learn's variables: set by its import in both
    assert forked.stdout.splitlines()[1:] == fresh.stdout.splitlines()[1:]
    assert forked.stderr.splitlines() == fresh.stderr.splitlines() == ["stderr line", "atexit ran"]


@pytest.mark.parametrize("mode,code,message", [("raise", 1, "ValueError: boom from the script"),
                                               ("exit_str", 1, "a message to stderr"), ("exit_int", 3, None)])
def test_exit_codes_and_tracebacks_as_the_interpreter_gives_them(script, tmp_path, mode, code, message):
    proc = run_script(script, [mode], cwd=tmp_path)
    assert proc.returncode == code
    assert json.loads(proc.stdout.splitlines()[0])["ppid"] == conftest._FORK_SERVER.proc.pid
    lines = proc.stderr.splitlines()
    assert lines[0] == "stderr line" and lines[-1] == "atexit ran"
    if message:
        assert lines[-2] == message
    if mode == "raise":
        assert lines[1] == "Traceback (most recent call last):" and f'File "{script}", line {RAISE_LINE}' in proc.stderr
    else:
        assert len(lines) == (3 if message else 2)


def test_variables_set_by_imports_do_not_stop_the_fork(script, tmp_path, monkeypatch):
    import sklearn  # noqa: F401  (sets KMP_* in this process, as it did in the server)

    monkeypatch.setenv("KMP_DUPLICATE_LIB_OK", os.environ.get("KMP_DUPLICATE_LIB_OK", "True"))
    proc = run_script(script, ["ok"], cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[0])["ppid"] == conftest._FORK_SERVER.proc.pid


def test_timeout_kills_the_run_and_the_server_goes_on(script, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired) as err:
        run_script(script, ["sleep"], cwd=tmp_path, timeout=20)
    assert "stderr line" in err.value.stderr
    ok = run_script(script, ["ok"], cwd=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout.splitlines()[0])["ppid"] == conftest._FORK_SERVER.proc.pid


def test_a_killed_server_is_restarted(script, tmp_path):
    run_script(script, ["ok"], cwd=tmp_path)
    old = conftest._FORK_SERVER.proc
    old.kill()
    old.wait(30)
    proc = run_script(script, ["ok"], cwd=tmp_path)
    assert proc.returncode == 0
    assert json.loads(proc.stdout.splitlines()[0])["ppid"] == conftest._FORK_SERVER.proc.pid != old.pid


def test_import_time_environment_gets_a_fresh_interpreter(script, tmp_path):
    proc = run_script(script, ["ok"], cwd=tmp_path, extra_env={"HF_HOME": str(tmp_path / "hf_home")})
    assert proc.returncode == 0
    assert json.loads(proc.stdout.splitlines()[0])["ppid"] == os.getpid()
    # threads other than the server's OMP_NUM_THREADS: set in the child
    proc = run_script(script, ["ok"], cwd=tmp_path, extra_env={"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    row = json.loads(proc.stdout.splitlines()[0])
    assert proc.returncode == 0 and row["threads"] == 2 and row["ppid"] == conftest._FORK_SERVER.proc.pid
