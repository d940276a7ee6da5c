"""The `hera` command as a user runs it: real subprocesses, one-line errors, the demo's JSON."""

import json
import os
import subprocess
import sys

from hera_core.serving.assembly import free_port
from tests.conftest import TINY


def hera(*args, env=None, timeout=300):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "hera_core.cli", *args], capture_output=True, text=True,
                          env=e, timeout=timeout)


def one_line_error(proc):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hera: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_bad_config_value(tmp_path):
    cfg = tmp_path / "hera.toml"
    cfg.write_text("[local]\nn_threads = 0\n")
    assert "local.n_threads" in one_line_error(hera("--config", str(cfg), "demo", "--tasks", "1"))


def test_missing_model_names_the_install_command(tmp_path):
    msg = one_line_error(hera("demo", "--tasks", "1", env={"HERA_CACHE_DIR": str(tmp_path)}))
    assert "hera models ensure" in msg


def test_unreachable_cloud_names_the_setting(tmp_path, tiny_model_path):
    env = {"HERA_CLOUD_BASE_URL": f"http://127.0.0.1:{free_port()}/v1", "HERA_LOCAL_MODEL": TINY,
           "HERA_LEDGER_PATH": str(tmp_path / "l.sqlite")}
    cfg = tmp_path / "hera.toml"
    cfg.write_text("[cloud]\ntimeout_s = 3\nmax_retries = 0\n")
    msg = one_line_error(hera("--config", str(cfg), "demo", "--tasks", "1", "--no-cache", env=env))
    assert "HERA_CLOUD_BASE_URL" in msg


def test_models_list():
    proc = hera("models", "list")
    assert proc.returncode == 0 and "smollm2-135m" in proc.stdout and "installed" in proc.stdout


def test_demo_json_reads_routes_and_costs_from_the_ledger(tmp_path, tiny_model_path):
    """The whole path with SmolLM2 as both models (plumbing): cloud-sim started and stopped by the demo."""
    cfg = tmp_path / "hera.toml"
    cfg.write_text("max_tokens = 64\n[policy]\nthreshold_offset = -0.3\n")
    env = {"HERA_LOCAL_MODEL": TINY, "HERA_CLOUD_MODEL": TINY, "HERA_LEDGER_PATH": str(tmp_path / "l.sqlite")}
    proc = hera("--config", str(cfg), "demo", "--tasks", "2", "--json", "--no-cache", env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("accuracy", "local_share", "cost_usd", "all_cloud_cost_usd", "all_cloud_accuracy", "subtasks"):
        assert key in out
    assert out["tasks"] == 2 and out["subtasks"] >= 2
    assert out["all_cloud_cost_usd"] > 0 and 0.0 <= out["local_share"] <= 1.0
    import sqlite3

    db = sqlite3.connect(tmp_path / "l.sqlite")
    n = db.execute("SELECT COUNT(*) FROM subtasks WHERE run=?", (out["runs"]["hera"],)).fetchone()[0]
    assert n == out["subtasks"]
    assert db.execute("SELECT COUNT(*) FROM subtasks WHERE run=? AND route='local'",
                      (out["runs"]["all_cloud"],)).fetchone()[0] == 0


def test_eval_offline_alone_replays_the_committed_run_or_says_where_it_is(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hera_core.cli", "eval", "--offline"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert "repository root" in one_line_error(proc)


def test_eval_families_takes_no_traces_and_an_offline_run_needs_its_cache(tmp_path):
    """`hera eval --families` evaluates built-in tasks without traces: with --traces as well it is a
    one-line error, and offline it names the completion cache it could not find."""
    assert "--families" in one_line_error(hera("eval", "--families", "workflow_quote", "--traces", "t.jsonl"))
    proc = subprocess.run([sys.executable, "-m", "hera_core.cli", "eval", "--offline", "--families", "workflow_quote",
                           "--cache", str(tmp_path / "none.sqlite")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert "none.sqlite does not exist" in one_line_error(proc)


def test_train_with_votes_calibrates_a_vote_stage_or_names_the_bad_file(tmp_path):
    """`hera train --votes` on the committed validation votes: the predictor gets a vote stage
    whose calibration the report shows; a missing votes file is a one-line error."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "bench" / "eval"
    out = tmp_path / "p.json"
    proc = hera("train", str(root / "traces-train.jsonl"), str(root / "traces-val.jsonl"),
                "--votes", str(root / "agreement-val.jsonl"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    d = json.loads(out.read_text())
    assert d["vote_stage"]["k"] == 4 and d["vote_stage"]["meta"]["tasks"] == 88
    assert d["vote_stage"]["meta"]["chosen"]["est_local_share"] > d["vote_stage"]["meta"]["first_stage_alone"]["est_local_share"]
    assert "does not exist" in one_line_error(hera("train", str(root / "traces-val.jsonl"), "--votes",
                                                    str(tmp_path / "nope.jsonl"), "--out", str(out)))


def test_train_cost_aware_writes_a_cost_weight_and_a_bad_budget_is_a_one_line_error(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "bench" / "eval"
    out = tmp_path / "p.json"
    proc = hera("train", str(root / "traces-train.jsonl"), str(root / "traces-val.jsonl"), "--cloud-budget", "0.5",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    d = json.loads(out.read_text())
    cal = d["meta"]["cost_calibration"]
    assert d["kappa"]["cost_weight"]["gamma"] == cal["chosen"]["gamma"] and cal["chosen"]["est_cost_ratio"] <= 0.5
    assert "cloud budget" in one_line_error(hera("train", str(root / "traces-val.jsonl"), "--cloud-budget", "2",
                                                 "--out", str(out)))


def test_only_hera_errors_are_one_line_errors_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """`main` turns a HeraError into one line (exit 2); any other exception, a ValueError or a
    LookupError included, is a bug and propagates with its traceback."""
    import pytest

    from hera_core import cli
    from hera_core.errors import CacheMissError, SelfTestFailed, UsageError

    monkeypatch.setattr("faulthandler.enable", lambda *a, **k: None)  # pytest's captured stderr has no fd
    for exc in (UsageError("bad --flag"), CacheMissError("cache miss"), SelfTestFailed("broken; fix: this")):
        def fail(args, exc=exc):
            raise exc
        monkeypatch.setattr(cli, "cmd_ledger", fail)
        assert cli.main(["ledger"]) == 2
        assert capsys.readouterr().err == f"hera: error: {exc}\n"
    for bug in (ValueError("a bug"), LookupError("another bug"), KeyError("k")):
        def fail(args, bug=bug):
            raise bug
        monkeypatch.setattr(cli, "cmd_ledger", fail)
        with pytest.raises(type(bug)):
            cli.main(["ledger"])


def test_user_mistakes_in_offline_commands_are_hera_errors(tmp_path):
    """What a user gets wrong raises a HeraError subclass (the CLI's one-line error), in process."""
    import pytest

    from hera_core.cli_offline import _sweep
    from hera_core.errors import UsageError
    from hera_core.offline.profiling import load_traces
    from hera_core.offline.workloads import load_jsonl_tasks, make_tasks

    with pytest.raises(UsageError, match="does not exist"):
        load_traces(tmp_path / "nope.jsonl")
    with pytest.raises(UsageError, match="does not exist"):
        load_jsonl_tasks(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"id": "t1", "question": "q"}\n')
    with pytest.raises(UsageError, match="line 1"):
        load_jsonl_tasks(str(bad))
    with pytest.raises(UsageError, match="unknown task family"):
        make_tasks(["no-such-family"])
    with pytest.raises(UsageError, match="--sweep"):
        _sweep("0.1,x")
    assert _sweep("") == () and _sweep("-0.1,0.2") == (-0.1, 0.2)
