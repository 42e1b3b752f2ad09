"""experiment.py killed (SIGKILL) at random moments of its train, measure and report phases (issue 26): after
every kill each file in a committed format still parses and no measured row is duplicated or half-written;
the next run of the same command finishes the work, and its tables equal an uninterrupted run's.

The tiny preset with seed 0 (two runs of a 2-block model, 20 steps). The kill moments are drawn from a seeded
generator, as fractions of how long the same phase took uninterrupted just before (a subprocess too, so
start-up and load count alike); which line of code a moment hits still depends on the machine's speed.
The report runs with the checkpoints of the "none" run removed, so that it skips the two notebooks
(minutes; tests/test_notebooks.py runs them).
"""

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ditnorm.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--preset", "tiny", "--seeds", "0"]
KILLS = 3  # per phase
# The columns that name a measured row: one row per value of these in each table.
KEYS = {
    "errors.csv": ("data", "norm", "seed", "step", "weights", "measure"),
    "outliers.csv": ("data", "norm", "seed", "step", "weights", "timestep", "block"),
    "direct.csv": ("data", "norm", "seed", "step", "weights", "timestep", "measure"),
}


def check_files(results):
    """Every file under results in a committed format parses; no csv row is half-written or repeated."""
    for path in results.rglob("*"):
        if path.is_dir() or path.name.endswith(".tmp"):
            continue
        if path.suffix == ".csv":
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
            assert rows and reader.fieldnames, path
            for row in rows:  # a cut row has fewer cells (None) or an empty last one
                assert None not in row and None not in row.values() and all(row.values()), (path, row)
                float(row["step"])
            keys = [tuple(r[k] for k in KEYS[path.name]) for r in rows]
            assert len(keys) == len(set(keys)), f"{path}: a measured row is repeated"
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".md":
            assert path.read_text(encoding="utf-8").strip(), path
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
        elif path.suffix == ".pt":
            checkpoint = read_checkpoint(path)
            assert {"config", "model", "ema", "step"} <= set(checkpoint), path


def command(phase, results):
    return [sys.executable, "experiment.py", phase, *FLAGS, "--results-dir", str(results)]


def run_killed(phase, results, delays):
    """The phase as a subprocess, SIGKILLed after each delay (or let finish if it ends first), then run to
    the end; the files are checked after each kill. Returns how many runs were killed mid-way."""
    killed = 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for delay in delays:
        proc = subprocess.Popen(command(phase, results), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=delay)
            assert proc.returncode == 0, err.decode()[-2000:]
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            killed += 1
        check_files(results)
    done = subprocess.run(command(phase, results), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    check_files(results)
    assert not list(results.rglob("*.tmp")), "a killed write's temporary file was left behind"
    return killed


def run_whole(phase, results):
    """The phase as a subprocess, uninterrupted; the seconds it took."""
    start = time.perf_counter()
    done = subprocess.run(command(phase, results), cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return time.perf_counter() - start


def test_killed_phases_leave_consistent_files_and_finish_as_uninterrupted(tmp_path):
    reference, killed_dir = tmp_path / "reference", tmp_path / "killed"
    rng = random.Random(26)
    killed = {}
    for phase in ("train", "measure", "report"):
        for results in (reference, killed_dir):
            if phase == "report":
                shutil.rmtree(results / "tiny" / "zeros-none-seed0")
        seconds = run_whole(phase, reference)  # the uninterrupted run, timed under today's load
        killed[phase] = run_killed(phase, killed_dir, [seconds * rng.uniform(0.1, 0.9) for _ in range(KILLS)])
    assert all(killed.values()), killed  # each phase was killed mid-way at least once

    record, expected = killed_dir / "tiny" / "res", reference / "tiny" / "res"
    tables = sorted(p.relative_to(expected) for p in expected.rglob("*.csv"))
    assert tables == sorted(p.relative_to(record) for p in record.rglob("*.csv")) and tables
    for table in tables:
        assert (record / table).read_bytes() == (expected / table).read_bytes(), table
    for name in ("headline.json",):
        assert json.loads((record / name).read_text()) == json.loads((expected / name).read_text())
    for name in ("errors.md", "headline.md"):
        assert (record / name).read_text() == (expected / name).read_text(), name
    for run in ("zeros-layernorm-seed0",):  # the trained weights themselves: resumed is bit-identical
        for step in ("0000010.pt", "0000020.pt"):
            ours = read_checkpoint(killed_dir / "tiny" / run / "checkpoints" / step)
            theirs = read_checkpoint(reference / "tiny" / run / "checkpoints" / step)
            assert all(ours["model"][k].equal(v) for k, v in theirs["model"].items()), (run, step)


def state_and_parent(pid):
    """(state letter, parent pid) of a process from /proc/<pid>/stat; None once it is gone."""
    try:
        state, ppid = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return None
    return state, int(ppid)


def children(pid):
    """The live processes whose parent is pid, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        info = state_and_parent(entry.name) if entry.name.isdigit() else None
        if info is not None and info[0] != "Z" and info[1] == pid:
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # it ended meanwhile
                continue
    return found


def alive(pid):
    info = state_and_parent(pid)
    return info is not None and info[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killing_the_runner_ends_its_side_by_side_workers(tmp_path):
    proc = subprocess.Popen([*command("train", tmp_path), "--jobs", "2"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline, workers = time.monotonic() + 60, []
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            workers = [pid for pid, cmd in children(proc.pid).items() if "spawn_main" in cmd]
            time.sleep(0.05)
        assert len(workers) == 2, "the runner did not start two workers"
        time.sleep(1.0)  # let them reach their work (or stay in start-up: both must end)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "a worker trains on after the runner was killed"
