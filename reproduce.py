"""Reproduce the toy experiment (`make reproduce`): seeds of both models, a headline, the notebooks.

    python reproduce.py                  # 3 seeds per norm; CPU: the CPU preset, CUDA: the paper schedule
    python reproduce.py --refresh-res    # maintainers: the same, then the record copied into res/reproduce
    python reproduce.py --preset tiny --results-dir /tmp/r    # seconds; what the tests run
    python reproduce.py --layernorm-run RUN --none-run RUN --steps 10000,50000 --results-dir DIR
                                         # no training: only the notebooks, on two given run folders

Training and sampling are study.py's: LayerNorm and no norm, zero data, --seeds seeds each, --jobs runs
at a time; every checkpoint samples from the same noise with the EMA weights and again with the raw ones.
The headline is the last checkpoint's median and max |x|, as the seed median [min, max]. The notebooks
then draw seed 0. Everything goes under --results-dir (ignored by git): runs/, notebooks/ (the executed
copies) and res/ (the record: headline.md, results.md, figures, tables). The command ends by setting the
headline beside the committed one (res/reproduce/headline.json) and saying where the new numbers fall.
The committed res/ changes only with --refresh-res (or an --out-dir in res/ with it).
"""

import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from diagram import plot_dit_block
from ditnorm import analysis
from ditnorm.checkpoint import CheckpointError, load_model
from ditnorm.options import Parser

ROOT = Path(__file__).resolve().parent
NORMS = ("layernorm", "none")
LABELS = {"layernorm": "LayerNorm", "none": "no norm"}
STATS = ("median", "max")
REFERENCE = ROOT / "res" / "reproduce"  # the committed record that a run is compared with

# study.py flags of each schedule. cpu: train_toy.py --preset cpu (batch 256, lr 1e-3, EMA 0.999, 5k
# steps) with a checkpoint every 1000 steps; 500 samples in 1000 ancestral steps keep the sampling of 6
# runs x 5 checkpoints x 2 weights to a few minutes on 2 cores. gpu: train_toy.py's defaults, the paper
# schedule. tiny: the tests.
SCHEDULES = {
    "cpu": dict(model="ToyDiT/1", global_batch_size=256, lr=1e-3, ema_decay=0.999, max_steps=5000,
                num_checkpoints=5, num_samples=500, sampling_steps=1000, device="cpu"),
    "gpu": dict(model="ToyDiT/1", global_batch_size=2048, lr=1e-4, ema_decay=0.9999, max_steps=50_000,
                num_checkpoints=10, num_samples=1000, sampling_steps=1000, device="cuda"),
    "tiny": dict(model="ToyDiT-XS/1", global_batch_size=32, lr=1e-3, ema_decay=0.9, max_steps=20,
                 num_checkpoints=2, num_samples=20, sampling_steps=10, device="cpu"),
}


class ReproduceError(Exception):
    """A stage failed; the message says which and where to look."""


def shown(path):
    """A path relative to the repo root when inside it (the notebooks run there), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


#################################################################################
#                         Headless notebook execution                           #
#################################################################################


def execute_notebook(path, parameters=None, executed_path=None, progress=False):
    """Run a notebook top to bottom in the repo root with papermill, its parameters cell overridden.

    The executed copy (outputs included, also when a cell fails) goes to executed_path. Raises
    ReproduceError with the failing cell's error on one line.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    parameters = {k: str(v) if isinstance(v, Path) else v for k, v in (parameters or {}).items()}
    unknown = set(parameters) - set(papermill.inspect_notebook(str(path)))
    if unknown:
        raise ReproduceError(f"{Path(path).name} has no parameter {', '.join(sorted(unknown))}; "
                             "check the names")
    if executed_path is not None:
        Path(executed_path).parent.mkdir(parents=True, exist_ok=True)
    try:
        return papermill.execute_notebook(str(path), executed_path and str(executed_path),
                                          parameters=parameters, kernel_name="python3", cwd=str(ROOT),
                                          progress_bar=progress)
    except PapermillExecutionError as e:
        where = f" (see {shown(executed_path)})" if executed_path is not None else ""
        raise ReproduceError(f"{Path(path).name} failed: {e.ename}: {e.evalue}{where}") from None


def notebook_text(nb):
    """All stream output of an executed notebook, for lines the notebook prints about skipped parts."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


#################################################################################
#                           Seeds: study.py and the headline                    #
#################################################################################


def study_command(schedule, args, runs_dir, res_dir, weights):
    """study.py: train (or reuse) every seed of both norms, then sample one kind of weights."""
    flags = {**SCHEDULES[schedule], "seeds": args.seeds, "jobs": args.jobs}
    cmd = [sys.executable, "study.py", "--preset", schedule, "--norms", ",".join(NORMS), "--data", "zeros",
           "--no-dyt-check", "--weights", weights, "--results-dir", shown(runs_dir),
           "--res-dir", shown(res_dir)]
    for key, value in flags.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def run_command(cmd):
    """Run a command in the repo root, output streamed; ReproduceError on failure."""
    print("$", shlex.join(["python", *cmd[1:]]), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise ReproduceError(f"command failed: {shlex.join(['python', *cmd[1:]])}")


def seed0_run(runs_dir, norm):
    """The run folder that study.py trained for seed 0 of a norm."""
    runs = sorted((runs_dir / f"zeros-{norm}-seed0").glob("*-*"))
    if not runs:
        raise ReproduceError(f"study.py left no run folder in {shown(runs_dir)}/zeros-{norm}-seed0")
    return runs[0]


def seed_values(csv_path):
    """{"norm stat": {step: [a value per seed, seed order]}} of |x| on zero data in a study_errors.csv."""
    import csv

    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["measure"] == "abs_x" and r["data"] == "zeros"]
    values = {}
    for r in sorted(rows, key=lambda r: int(r["seed"])):
        for stat in STATS:
            values.setdefault(f"{r['norm']} {stat}", {}).setdefault(int(r["step"]), []).append(float(r[stat]))
    return values


def plot_headline(values, path, title):
    """Median and max |x| against step, EMA and raw weights: seed median (line) and min-max (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.9), sharex=True)
    colors = {"layernorm": "tab:orange", "none": "tab:blue"}
    for ax, stat in zip(axes, STATS, strict=True):
        for weights, style in (("ema", "-"), ("raw", "--")):
            for norm in NORMS:
                by_step = values[weights][f"{norm} {stat}"]
                steps = sorted(by_step)
                med, low, high = zip(*(spread(by_step[s]) for s in steps), strict=True)
                ax.plot(steps, med, style, marker="o", markersize=3, color=colors[norm],
                        label=f"{LABELS[norm]}, {weights.upper() if weights == 'ema' else weights}")
                ax.fill_between(steps, low, high, color=colors[norm], alpha=0.12, linewidth=0)
        ax.set_yscale("log")
        ax.set_title(f"{stat} |x| over the samples (target: 0)", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(True, which="both", linewidth=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9.5)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def spread(values):
    """(median, min, max) of a list of per-seed values (nan-free)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    return float(np.median(v)), float(v.min()), float(v.max())


def cell(values):
    med, low, high = spread(values)
    return f"{med:.1e} [{low:.1e}, {high:.1e}]"


def relation(ln, none):
    """How the LayerNorm seeds lie against the no-norm seeds."""
    if min(ln) > max(none):
        return "every LayerNorm seed higher"
    if max(ln) < min(none):
        return "every LayerNorm seed lower"
    return "seed ranges overlap"


def headline_markdown(headline):
    """The headline table: per weights and statistic, both norms' seed spread, their ratio, the overlap."""
    setup = headline["setup"]
    lines = [
        "# Headline: LayerNorm against no norm (made by reproduce.py)", "",
        f"{setup['model']}, batch {setup['global_batch_size']}, AdamW lr {setup['lr']:g}, EMA "
        f"{setup['ema_decay']}, {setup['max_steps']} steps, zero data; {setup['seeds']} seeds per norm. "
        f"Step {headline['step']}: {setup['num_samples']} samples per model in {setup['sampling_steps']} "
        "ancestral steps, the same noise for every model; |x| is the error. A cell: median over seeds "
        "[min, max].", "",
        "| weights | error | LayerNorm | no norm | LayerNorm / no norm | seeds |",
        "|---|---|---|---|---:|---|",
    ]
    for weights in ("ema", "raw"):
        values = headline["values"][weights]
        for stat in STATS:
            ln, none = values[f"layernorm {stat}"], values[f"none {stat}"]
            ratio = spread(ln)[0] / spread(none)[0]
            lines.append(f"| {weights.upper() if weights == 'ema' else weights} | {stat} abs x | {cell(ln)} "
                         f"| {cell(none)} | {ratio:.2g}x | {relation(ln, none)} |")
    lines += ["", f"Machine: {headline['machine']}."]
    return "\n".join(lines) + "\n"


def compare(new, reference):
    """Lines setting the new headline beside the committed one: where each new seed median falls."""
    if reference is None:
        return ["No committed headline to compare with (res/reproduce/headline.json is missing)."]
    if reference["setup"] != new["setup"]:
        differ = sorted(k for k in new["setup"] if new["setup"][k] != reference["setup"].get(k))
        return [f"The committed headline is of another configuration ({', '.join(differ)} differ); not "
                "compared."]
    lines = [f"Against the committed headline ({reference['machine']}):", "",
             "| weights | error | norm | this run | committed | this run's median |",
             "|---|---|---|---|---|---|"]
    outside = []
    for weights in ("ema", "raw"):
        for key, values in new["values"][weights].items():
            ref = reference["values"][weights][key]
            med, (_, low, high) = spread(values)[0], spread(ref)
            where = "inside the committed seed range" if low <= med <= high else (
                "below the committed seed range" if med < low else "above the committed seed range")
            if not low <= med <= high:
                outside.append(f"{weights} {key}")
            norm, stat = key.split()
            lines.append(f"| {weights} | {stat} abs x | {LABELS[norm]} | {cell(values)} | {cell(ref)} "
                         f"| {where} |")
    total = sum(len(v) for v in new["values"].values())
    lines += ["", f"{total - len(outside)} of {total} new seed medians fall inside the committed seed ranges"
              + (f"; outside: {', '.join(outside)}." if outside else ".")]
    return lines


#################################################################################
#                                   Record                                      #
#################################################################################


def hardware():
    """One line each: CPU model and cores, GPUs, torch and python versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [f"CPU: {cpu}, {len(os.sched_getaffinity(0))} cores available",
            f"GPU: {', '.join(gpus) if gpus else 'none'}",
            f"torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}"]


def write_results(path, *, argv, stages, hw, record, skipped, comparison):
    """results.md: the headline, the comparison, the commands, the hardware and the timings."""

    def read(name):
        return (record / name).read_text().strip() if (record / name).is_file() else "(not written)"

    lines = [
        "# Reproduction results", "",
        f"Written by `{shlex.join(['python', 'reproduce.py', *argv])}` on "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}.", "",
        "## Hardware", "", *[f"- {h}" for h in hw], "",
        "## Stages", "", "| stage | command | wall time |", "|---|---|---:|",
        *[f"| {name} | `{cmd}` | {seconds:.0f} s |" for name, cmd, seconds in stages],
        f"| total | | {sum(s for _, _, s in stages):.0f} s |", "",
    ]
    if (record / "headline.md").is_file():
        lines += ["## " + read("headline.md").removeprefix("# "), "", "## Comparison", "", *comparison, ""]
    lines += ["## Seed 0: toy samples (|x| is the error)", "", read("toydit_errors.md"), "",
              "## Seed 0: residual-stream outliers (massive: > 100 and >= 1000x the median)", "",
              read("token_outliers.md"), "", "## Figures", "",
              *[f"- {p.relative_to(record)}" for p in sorted(record.rglob("*.png"))]]
    if skipped:
        lines += ["", "## Skipped", "", *[f"- {s}" for s in skipped]]
    Path(path).write_text("\n".join(lines) + "\n")


#################################################################################
#                                    Main                                       #
#################################################################################


def parse_args(argv):
    summary, details = __doc__.split("\n\n", 1)
    p = Parser(description=summary, epilog="examples:\n" + details)
    p.add_argument("--preset", choices=("auto", *SCHEDULES), default="auto",
                   help="auto: gpu (the paper schedule) with CUDA, else cpu")
    p.add_argument("--seeds", type=int, default=3, help="seeds per norm (seeds 0..N-1)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once, one thread each (default: the available cores; 1 with CUDA)")
    p.add_argument("--results-dir", default="results/reproduce",
                   help="runs, executed notebooks and the record")
    p.add_argument("--refresh-res", action="store_true",
                   help="maintainers: copy the finished record into res/reproduce (or --out-dir), the "
                   "committed files that the next run compares with")
    p.add_argument("--out-dir", help="copy the finished record here too (inside res/: needs --refresh-res)")
    p.add_argument("--reference", default="res/reproduce/headline.json",
                   help="the headline to compare with (default: %(default)s, the committed one)")
    p.add_argument("--layernorm-run", help="no training: run the notebooks on this run folder of "
                   "train_toy.py --norm layernorm (with --none-run)")
    p.add_argument("--none-run", help="the same for --norm none (with --layernorm-run)")
    p.add_argument("--steps", help="comma-separated checkpoint steps of the toy figures (default: the first "
                   "and last that both runs saved); the token figures use the last of them")
    p.add_argument("--pretrained", default="DiT-XL-2-256x256.pt",
                   help="checkpoint of the embedding figure: official name (downloaded) or path; '' skips it")
    p.add_argument("--num-sampling-steps", type=int, default=1000, help="sampling steps of the toy figures")
    args = p.parse_args(argv)
    if bool(args.layernorm_run) != bool(args.none_run):
        p.error("--layernorm-run and --none-run go together: give both or neither")
    if args.seeds < 1 or (args.jobs is not None and args.jobs < 1):
        p.error("--seeds and --jobs must be at least 1")
    args.schedule = args.preset if args.preset != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if args.schedule == "gpu" and not torch.cuda.is_available():
        p.error("--preset gpu needs a CUDA GPU; use --preset cpu (or auto) on this machine")
    if args.jobs is None:
        args.jobs = 1 if args.schedule == "gpu" else len(os.sched_getaffinity(0))
    args.jobs = min(args.jobs, len(NORMS) * args.seeds)
    args.wanted_steps = None
    if args.steps is not None:
        try:
            args.wanted_steps = sorted({int(step) for step in args.steps.split(",")})
        except ValueError:
            p.error(f"--steps {args.steps}: give comma-separated integers, e.g. 10000,50000")
    dest = Path(args.out_dir).resolve() if args.out_dir else (REFERENCE if args.refresh_res else None)
    if dest is not None and dest.is_relative_to(ROOT / "res") and not args.refresh_res:
        p.error(f"--out-dir {args.out_dir} is inside the committed res/; add --refresh-res to rewrite it")
    args.dest = dest
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    results_dir = Path(args.results_dir).resolve()
    record = results_dir / "res"
    if args.dest is not None and args.dest in (record, *record.parents):
        raise SystemExit(f"error: --out-dir {args.out_dir} holds this run's own folders; pick another")
    reference_path = ROOT / args.reference
    reference = json.loads(reference_path.read_text()) if reference_path.is_file() else None
    stages, skipped, comparison = [], [], []
    try:
        if record.exists():
            shutil.rmtree(record)  # the record of an earlier run here: every file below is this run's
        record.mkdir(parents=True)
        if args.layernorm_run:
            runs = {"layernorm": Path(args.layernorm_run).resolve(), "none": Path(args.none_run).resolve()}
            for norm, run in runs.items():
                try:  # a swapped pair fails here, not inside a notebook
                    load_model(analysis.checkpoint_at(run), norm=norm)
                except (CheckpointError, FileNotFoundError) as e:
                    raise ReproduceError(f"--{norm}-run {getattr(args, norm + '_run')}: {e}") from None
            analysis.find_run_pair(results_dir, runs["layernorm"], runs["none"])
        else:
            plot_dit_block().savefig(record / "dit_block.png", dpi=130)
            runs_dir = results_dir / "runs"
            for weights, res_dir in (("ema", record / "seeds"), ("raw", record / "seeds" / "raw")):
                cmd = study_command(args.schedule, args, runs_dir, res_dir, weights)
                start = time.perf_counter()
                run_command(cmd)
                name = "train and sample, EMA weights" if weights == "ema" else "sample, raw weights"
                stages.append((name, shlex.join(["python", *cmd[1:]]), time.perf_counter() - start))
            setup = {**SCHEDULES[args.schedule], "seeds": args.seeds}
            del setup["device"]
            by_step = {weights: seed_values(res_dir / "study_errors.csv")
                       for weights, res_dir in (("ema", record / "seeds"), ("raw", record / "seeds" / "raw"))}
            step = max(by_step["ema"]["layernorm median"])
            values = {w: {key: v[step] for key, v in table.items()} for w, table in by_step.items()}
            headline = dict(setup=setup, step=step, values=values, machine=", ".join(hardware()[:2]))
            plot_headline(by_step, record / "headline.png",
                          f"{setup['model']}, zero data, batch {setup['global_batch_size']}, "
                          f"{setup['num_samples']} samples per point\n" + (
                              f"line: median over {args.seeds} seeds; band: min-max over seeds"
                              if args.seeds > 1 else "one seed (no band)"))
            (record / "headline.json").write_text(json.dumps(headline, indent=1) + "\n")
            (record / "headline.md").write_text(headline_markdown(headline))
            comparison = compare(headline, reference)
            runs = {norm: seed0_run(runs_dir, norm) for norm in NORMS}
        steps = analysis.paired_steps(runs.values(), args.wanted_steps)
        executed = results_dir / "notebooks"
        jobs = [
            ("ToyDiT_visualization.ipynb", dict(steps=steps, layernorm_run=shown(runs["layernorm"]),
                                                 none_run=shown(runs["none"]), out_dir=shown(record),
                                                 num_sampling_steps=args.num_sampling_steps)),
            ("TokenEmbeddingsViz.ipynb", dict(checkpoint=args.pretrained, out_dir=shown(record),
                                               layernorm_run=shown(runs["layernorm"]),
                                               none_run=shown(runs["none"]), toy_step=steps[-1])),
        ]
        for i, (name, params) in enumerate(jobs, 1):
            print(f"notebook {i}/{len(jobs)}: {name} (seed 0) -> {shown(executed / name)}", flush=True)
            start = time.perf_counter()
            nb = execute_notebook(ROOT / name, params, executed / name, progress=True)
            stages.append((f"notebook {name}", f"{name} with {params}", time.perf_counter() - start))
            skipped += [line for line in notebook_text(nb).splitlines() if line.startswith("SKIPPED")]
        write_results(record / "results.md", argv=argv, stages=stages, hw=hardware(), record=record,
                      skipped=skipped, comparison=comparison)
    except (ReproduceError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if (record / "headline.md").is_file():
        print("\n" + (record / "headline.md").read_text().split("\n", 2)[2] + "\n" + "\n".join(comparison))
    for line in skipped:
        print(line)
    print(f"wrote {shown(record)}/ (results.md, headline.md, figures); executed notebooks in "
          f"{shown(results_dir / 'notebooks')}/")
    if args.dest is not None:
        if args.dest == REFERENCE and REFERENCE.exists():
            shutil.rmtree(REFERENCE)  # the whole committed record is this run's: no stale file stays
        shutil.copytree(record, args.dest, dirs_exist_ok=True)
        print(f"copied the record into {shown(args.dest)}/ (--refresh-res / --out-dir)")


if __name__ == "__main__":
    main()
