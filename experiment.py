"""Run any experiment of the repository: a preset of ditnorm/presets.py, one phase at a time.

    python experiment.py train --preset paper --seeds 0,1,2 --jobs 2   # train or resume every run
    python experiment.py measure --preset paper --jobs 2               # every checkpoint not yet measured
    python experiment.py report --preset paper                         # tables and figures from what exists
    python experiment.py report --preset reproduce --refresh-res       # maintainers: rewrite res/reproduce/

Run folders go to results/<preset>/<run>/ (checkpoints, log.txt, config.json). Measurements go to
<record>/runs/<run>/ and the report to <record>/, where <record> is results/<preset>/res/ by default and the
committed res/<preset>/ with --refresh-res (nothing else writes res/). Every phase can be killed at any
moment and run again: training resumes from a run's last checkpoint, a measured checkpoint is not measured
again, and every file is replaced whole (written to a temporary file, then renamed); workers end with the
runner. A run's statistics folder records the checkpoints it was measured from (checkpoints.json); measuring
a retrained run into a folder of an earlier training is refused, not mixed, and a run whose record holds
its last step is not trained again (with --refresh-res: the committed runs, where the checkpoints are
gone); the paper preset's statistics measured before that record was kept are adopted where the
checkpoints on disk give back their weights.csv exactly.
"""

import datetime
import os
import platform
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from ditnorm import layout, provenance
from ditnorm.files import CheckpointError, record_checkpoints, recorded_checkpoints, stats_checkpoints
from ditnorm.layout import run_checkpoints
from ditnorm.options import (
    Parser,
    add_fast_flag,
    check_device,
    check_folder,
    device,
    positive_int,
    seed_list,
    step_set,
)
from ditnorm.presets import PRESETS, grids, runs
from ditnorm.records import RowsError

ROOT = Path(__file__).resolve().parent


def parse_args(argv=None):
    summary, details = __doc__.split("\n\n", 1)
    parser = Parser(prog="experiment.py", description=summary, epilog=details)
    parser.add_argument("phase", choices=("train", "measure", "report"))
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True, help="the experiment")
    parser.add_argument("--seeds", type=seed_list,
                        help="comma-separated seeds, e.g. 0,1,2 (default: the preset's)")
    parser.add_argument("--jobs", type=positive_int, default=1, help="runs side by side, one thread each")
    parser.add_argument("--device", type=device, default="cpu", help="train and measure here")
    parser.add_argument("--steps", type=step_set, help="measure: only these comma-separated checkpoint steps")
    add_fast_flag(parser)
    parser.add_argument("--results-dir", default="results", help="run folders go to <this>/<preset>/")
    parser.add_argument("--refresh-res", action="store_true",
                        help="measure and report into the committed res/<preset>/ (maintainers)")
    args = parser.parse_args(argv)
    if problem := check_device(args.device):
        parser.error(f"--device {args.device}: {problem}")
    if problem := check_folder(args.results_dir):
        parser.error(f"--results-dir {args.results_dir}: {problem}")
    return args


def train_one(cfg, run_dir, device, fast):
    torch.set_num_threads(1)
    from ditnorm.trainer import train_run  # the lead's trainer; imported here so measure and report need none

    train_run(cfg, run_dir, device=device, fast=fast, console=Path(run_dir).name)  # its log lines, labelled
    return f"trained {run_dir}"


def measure_one(preset, name, cfg, run_dir, out, options):
    torch.set_num_threads(1)
    steps = PRESETS[preset]["measure"](
        dict(PRESETS[preset], cfg=cfg), dict(name=name, cfg=cfg, dir=run_dir), out, options
    )
    return f"{name}: {len(steps)} checkpoint(s) measured"


def measured_from(preset, run_dir, out):
    """The checkpoint digests `out` will record once run_dir's checkpoints are measured into it. Statistics
    measured before digests were kept are adopted only where the preset can prove they are of this training
    (its "adopt": for the paper schedule, weights.csv recomputed exactly); otherwise a CheckpointError."""

    def adopt(out, checkpoints):
        steps = preset["adopt"](run_dir, out, checkpoints)
        print(f"experiment: {out} adopted: the checkpoints of {run_dir} reproduce its weights.csv exactly at "
              f"step(s) {', '.join(map(str, steps))}")

    return stats_checkpoints(out, run_checkpoints(run_dir), adopt=adopt if "adopt" in preset else None)


def hardware():
    """One line each: CPU model and cores, GPUs, torch and python versions (said in the reports)."""
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    gpu = ", ".join(gpus) or "none"
    return [f"CPU: {cpu}, {len(os.sched_getaffinity(0))} cores available", f"GPU: {gpu}",
            f"torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}"]


def end_with(parent):
    """Make this worker process end when `parent` does (Linux), so that killing experiment.py leaves no
    orphan training on in a run folder that the next command would train too."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def side_by_side(fn, jobs, tasks):
    """fn(*task) for every task, `jobs` processes at a time (in this process for one job)."""
    if jobs == 1 or len(tasks) <= 1:
        return [fn(*task) for task in tasks]
    # spawn, not fork: a forked torch process can deadlock in its thread pool.
    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=get_context("spawn"), initializer=end_with,
                             initargs=(os.getpid(),)) as pool:
        return list(pool.map(fn, *zip(*tasks, strict=True)))


def report(name, preset, grid, record, runs_dir, now=None, machine=None):
    """The preset's report phase into `record` from record/runs/; now and machine (hardware()'s lines), said
    in some reports, default to this moment and this machine."""
    torch.set_num_threads(1)
    options = dict(preset=name, runs=grid, runs_dir=runs_dir, reference=ROOT / "res" / name / "headline.json",
                   now=now or datetime.datetime.now(), hardware=machine or hardware())
    preset["report"](dict(preset, cfg=grid[0][1]), record, options)


def main(argv=None):
    args = parse_args(argv)
    preset, grid = PRESETS[args.preset], runs(args.preset, args.seeds)
    if args.seeds is not None:
        listed = grids(preset, args.seeds)
        preset = dict(preset, grid=listed if isinstance(preset["grid"], list) else listed[0])
    runs_dir, record = layout.record_of(args.preset, args.results_dir, args.refresh_res)
    if args.phase == "train":
        unfinished = [(name, cfg) for name, cfg in grid
                      if cfg["max_steps"] not in run_checkpoints(runs_dir / name)]
        try:  # a run whose record holds its last step is done: another training could not join that record
            done = [name for name, cfg in unfinished
                    if cfg["max_steps"] in recorded_checkpoints(layout.measured(record, name))]
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        tasks = [(cfg, runs_dir / name, args.device, args.fast)
                 for name, cfg in unfinished if name not in done]
        results = side_by_side(train_one, args.jobs, tasks) + [
            f"{name}: not trained; {layout.measured(record, name)} holds its finished training's statistics"
            for name in done]
    elif args.phase == "measure":
        options = dict(device=args.device, fast=args.fast, steps=args.steps)
        tasks = [(args.preset, name, cfg, runs_dir / name, layout.measured(record, name), options)
                 for name, cfg in grid if run_checkpoints(runs_dir / name)]
        try:  # every run checked before any is measured or recorded
            digests = [(out, measured_from(preset, run_dir, out)) for *_, run_dir, out, _ in tasks]
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        for out, recorded in digests:
            record_checkpoints(out, recorded)
        try:
            results = side_by_side(measure_one, args.jobs, tasks)
        except RowsError as e:  # a measured file damaged or foreign: measuring on into it would lose rows
            raise SystemExit(f"error: {e}; move it away and measure again") from None
    else:
        try:
            report(args.preset, preset, grid, record, runs_dir)
        except RowsError as e:  # before anything is written: the report reads every file first
            raise SystemExit(f"experiment.py: error: {e}; delete it and run experiment.py measure again to "
                             "rewrite it") from None
        results = [f"report in {record}"]
        if args.refresh_res:
            provenance.write(ROOT / "res")
            results.append("res/PROVENANCE.md rewritten")
    print("\n".join(f"experiment: {line}" for line in results) or "experiment: nothing to do")


if __name__ == "__main__":
    sys.exit(main())
