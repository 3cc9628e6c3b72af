"""perf/gpu_session.sh and perf/fetch_gpu_wheels.sh on a CPU machine: argument handling, the stage
budget logic and the output layout (``--dry-run``), and that every stage's command line is one
its Python entry point accepts."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SESSION = ROOT / "perf" / "gpu_session.sh"
FETCH = ROOT / "perf" / "fetch_gpu_wheels.sh"
STAGES = ["env", "tests", "tune", "tuning", "perf-bf16", "perf-fp32", "perf-fwd-bwd", "linear",
          "vocab-parallel", "tune-more", "report"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(script, *args, timeout=60, env=None):
    return subprocess.run(["bash", str(script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})


def stage_rows(out: Path) -> dict[str, tuple[int, int, str]]:
    """stage -> (budget s, used s, status) from session.md's table."""
    return {stage: row[1:] for stage, row in timed_stage_rows(out).items()}


def timed_stage_rows(out: Path) -> dict[str, tuple[int, int, int, str]]:
    """stage -> (starts at s, budget s, used s, status) from session.md's table."""
    rows = {}
    for line in (out / "session.md").read_text().splitlines():
        match = re.match(r"\| ([\w-]+) \| (\d+) \| (\d+) \| (\d+) \| ([^|]+) \| logs/", line)
        if match:
            rows[match[1]] = (int(match[2]), int(match[3]), int(match[4]), match[5].strip())
    return rows


def listed_budgets() -> dict[str, int]:
    """stage -> nominal budget s from --list (its header and total lines left out)."""
    lines = run(SESSION, "--list").stdout.splitlines()
    assert lines[0].split() == ["stage", "budget", "s", "starts", "at", "s"] and lines[-1].startswith("total 510 s")
    return {line.split()[0]: int(line.split()[1]) for line in lines[1:-1]}


def test_dry_run_writes_the_layout_and_exits_0(tmp_path):
    out = tmp_path / "session"
    done = run(SESSION, "--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = stage_rows(out)
    assert list(rows) == STAGES  # most important first, the report last
    assert all(status == "dry-run" for _b, _u, status in rows.values())
    nominal = {"env": 40, "tests": 150, "tune": 55, "tuning": 30, "perf-bf16": 80, "perf-fp32": 35,
               "perf-fwd-bwd": 30, "linear": 30, "vocab-parallel": 20}
    assert {k: rows[k][0] for k in nominal} == nominal
    assert sum(listed_budgets().values()) == 510  # the 8.5-minute default total
    assert (out / "autotune").is_dir() and "DRY RUN" in (out / "session.md").read_text()
    for stage in STAGES:
        log = (out / "logs" / f"{stage}.log").read_text()
        assert log.startswith("command: ") and "dry run: not run" in log
    assert f"BITEMPERED_CACHE_DIR" not in (out / "logs" / "tune.log").read_text()  # exported, not inlined


def test_dry_run_shows_every_stage_budget_and_start(tmp_path):
    """Without --fake-stage-s a dry run counts every stage as its whole budget: the plan, in which
    each stage starts when the ones before it have used theirs, and --list shows the same."""
    out = tmp_path / "plan"
    done = run(SESSION, "--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = timed_stage_rows(out)
    budgets = listed_budgets()
    start = 0
    for stage in STAGES:
        assert rows[stage] == (start, budgets[stage], budgets[stage], "dry-run"), stage
        start += budgets[stage]
    assert start == 510 and "Finished after 510 s of 510." in (out / "session.md").read_text()
    printed = done.stdout.splitlines()
    assert printed[0].split() == ["stage", "starts", "at", "s", "budget", "s", "used", "s", "status"]
    assert printed[STAGES.index("tune-more") + 1].split() == ["tune-more", "470", "15", "15", "dry-run"]
    listed = run(SESSION, "--list").stdout.splitlines()
    assert listed[STAGES.index("report") + 1].split()[:3] == ["report", "25", "485"]


def test_budgets_scale_with_the_total_and_late_stages_give_way(tmp_path):
    out = tmp_path / "half"
    done = run(SESSION, "--dry-run", "--out", str(out), "--budget-s", "255")
    assert done.returncode == 0, done.stderr
    rows = stage_rows(out)
    assert rows["env"][0] == 20 and rows["tests"][0] == 75 and rows["perf-fwd-bwd"][0] == 15
    # each stage "takes" 40 s: the budget runs out, later stages are skipped, the report still runs
    out = tmp_path / "tight"
    done = run(SESSION, "--dry-run", "--out", str(out), "--budget-s", "160", "--fake-stage-s", "40")
    assert done.returncode == 0, done.stderr
    rows = stage_rows(out)
    assert rows["tests"] == (47, 40, "dry-run")  # 150 * 160 / 510
    skipped = [s for s, (_b, _u, status) in rows.items() if status.startswith("skipped (under")]
    assert skipped and "report" not in skipped and rows["report"][2] == "dry-run"
    ran_before_report = sum(used for s, (_b, used, _st) in rows.items() if s != "report")
    assert ran_before_report <= 160 - 25  # the report's reserve is never spent by other stages
    assert sum(used for _b, used, _s in rows.values()) <= 160


def test_skip_and_only(tmp_path):
    out = tmp_path / "only"
    done = run(SESSION, "--dry-run", "--out", str(out), "--only", "tune", "--only", "tuning",
               "--skip", "tuning")
    assert done.returncode == 0, done.stderr
    status = {s: row[2] for s, row in stage_rows(out).items()}
    assert status["tune"] == "dry-run" and status["report"] == "dry-run"
    assert status["tuning"] == "skipped (asked)" and status["tests"] == "skipped (asked)"


def test_archive_holds_the_whole_folder(tmp_path):
    out, archive = tmp_path / "folder", tmp_path / "back" / "session.tar.gz"
    done = run(SESSION, "--dry-run", "--out", str(out), "--archive", str(archive))
    assert done.returncode == 0, done.stderr
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "folder/session.md" in names and "folder/logs/report.log" in names


def test_real_run_records_ok_failed_and_timed_out_stages_and_keeps_going(tmp_path):
    """Not a dry run: stage commands replaced by stand-ins (the runner's test hook), with a short
    kill grace so that a stage past its limit is stopped within seconds."""
    out = tmp_path / "real"
    env = {"GPU_SESSION_MIN_STAGE_S": "1", "GPU_SESSION_KILL_GRACE_S": "1",
           "GPU_SESSION_OVERRIDE_tune": "echo tuned; sleep 100",
           "GPU_SESSION_OVERRIDE_tuning": "echo partial; exit 3",
           "GPU_SESSION_OVERRIDE_report": "echo report ran"}
    done = run(SESSION, "--out", str(out), "--budget-s", "45", "--only", "tune", "--only", "tuning",
               env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = stage_rows(out)
    assert rows["tune"][0] == 4 and rows["tune"][2] == "timed out (rc 124)"  # 55 * 45 / 510
    assert rows["tune"][1] <= 4
    assert rows["tuning"][2] == "failed (rc 3)" and rows["report"][2] == "ok"
    assert rows["env"][2] == "skipped (asked)"
    assert "tuned" in (out / "logs" / "tune.log").read_text()  # output before the stop is kept
    assert "report ran" in (out / "logs" / "report.log").read_text()


@pytest.mark.parametrize("args, message", [
    (["--budget-s", "abc"], "--budget-s must be a number"),
    (["--budget-s", "20"], "--budget-s must be >="),
    (["--only", "nope"], "unknown stage 'nope'"),
    (["--skip"], "--skip needs a stage"),
    (["--fake-stage-s", "5"], "only goes with --dry-run"),
    (["--dry-run", "--fake-stage-s", "x"], "--fake-stage-s must be a number"),
    (["--frobnicate"], "unknown argument '--frobnicate'"),
])
def test_bad_arguments_exit_2_with_a_reason(args, message):
    done = run(SESSION, *args)
    assert done.returncode == 2 and message in done.stderr, (done.returncode, done.stderr)


def test_help_and_list():
    done = run(SESSION, "--help")
    assert done.returncode == 0 and "--dry-run" in done.stdout and "--budget-s" in done.stdout
    done = run(SESSION, "--list")
    assert done.returncode == 0 and list(listed_budgets()) == STAGES


def test_every_stage_command_is_accepted_by_its_entry_point(tmp_path):
    """The dry run's command lines parse with the real argument parsers (no stale flags)."""
    from bitempered import tune
    from perf import harness, linear, vocab_parallel

    out = tmp_path / "cmds"
    assert run(SESSION, "--dry-run", "--out", str(out)).returncode == 0
    parsers = {"bitempered.tune": tune.parse_args,
               "perf": harness.parse_args, "perf.linear": linear.parse_args,
               "perf.vocab_parallel": vocab_parallel.parse_args}
    checked = set()
    for stage in STAGES:
        command = (out / "logs" / f"{stage}.log").read_text().splitlines()[0].removeprefix("command: ")
        words = shlex.split(command.replace("$(python_plugin_flags)", ""))
        if words[1:3] == ["-m", "pytest"]:
            assert words[-1] == "tests" and any(w.startswith("--junitxml=") for w in words)
            continue
        if words[0] == "bash":
            assert words[1:3] == ["perf/gpu_session.sh", "--env-stage"]
            continue
        assert words[1] == "-m" and words[2] in parsers, command
        args = parsers[words[2]](words[3:])
        checked.add(words[2])
        for folder in (getattr(args, "out", None), getattr(args, "report", None)):
            assert folder is None or Path(folder) == out.resolve()
    assert checked == set(parsers)
    tuning = (out / "logs" / "tuning.log").read_text().splitlines()[0]
    assert "-m bitempered.tune " in tuning and f"--report {out.resolve()}" in tuning  # side by side


def test_fetch_gpu_wheels_dry_run_and_arguments():
    done = run(FETCH, "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all("pip download --no-deps --only-binary=:all:" in l for l in lines)
    assert all("--python-version 3.12" in l and "-d .whl" in l for l in lines)
    assert any("jax-triton==" in l for l in lines) and any("liger-kernel" in l for l in lines)
    assert run(FETCH, "--python-version", "twelve").returncode == 2
    assert run(FETCH, "--bogus").returncode == 2
    assert "/.whl/" in (ROOT / ".gitignore").read_text().splitlines()
