"""Reproduce the study end to end (`make reproduce`): train both toy models, run both notebooks, write res/.

    python reproduce.py                 # train (GPU schedule with CUDA, else --preset cpu), run notebooks
    python reproduce.py --skip-train    # reuse the newest run folders in --results-dir
    python reproduce.py --layernorm-run RUN --none-run RUN --steps 10000,50000 --out-dir res/other
                                        # evaluate two given run folders (no training)

Writes the figures of both notebooks, res/toydit_errors.md, res/token_outliers.md and res/results.md (the
numbers, the commands, the hardware and the wall time of every stage). Executed copies of the notebooks go
to <results-dir>/notebooks/.
"""

import argparse
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import analysis
from checkpoint import CheckpointError, load_model

ROOT = Path(__file__).resolve().parent
NORMS = ("layernorm", "none")
TOY_MODEL = "ToyDiT/1"  # train_toy.py's default model


def shown(path):
    """A path relative to the repo root when inside it (the notebooks run there), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class ReproduceError(Exception):
    """A stage failed; the message says which and where to look."""


#################################################################################
#                         Headless notebook execution                           #
#################################################################################


def inject_parameters(source, parameters):
    """Replace `name = value` lines of a parameters cell with repr(new value); comments are kept."""
    unknown = set(parameters)
    lines = []
    for line in source.splitlines():
        m = re.match(r"^(\w+)\s*=\s*(.*?)(\s+#.*)?$", line)
        if m and m.group(1) in parameters:
            value = parameters[m.group(1)]
            value = str(value) if isinstance(value, Path) else value
            line = f"{m.group(1)} = {value!r}{m.group(3) or ''}"
            unknown.discard(m.group(1))
        lines.append(line)
    if unknown:
        raise ValueError(f"the parameters cell has no {', '.join(sorted(unknown))}; check the names")
    return "\n".join(lines)


def execute_notebook(path, parameters=None, executed_path=None, timeout=None):
    """Run a notebook top to bottom in the repo root with the "parameters" cell's values replaced.

    The executed copy (outputs included, also when a cell fails) is written to executed_path if given.
    Raises ReproduceError with the failing cell's error on one line.
    """
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ReproduceError(f"{path} must have exactly one cell tagged 'parameters', found {len(cells)}")
    cells[0].source = inject_parameters(cells[0].source, parameters or {})
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
    except CellExecutionError as e:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # IPython colours its tracebacks
        last = [line for line in plain.strip().splitlines() if line.strip()][-1]
        raise ReproduceError(f"{Path(path).name} failed: {last}"
                             + (f" (see {executed_path})" if executed_path else "")) from e
    finally:
        if executed_path:
            Path(executed_path).parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, executed_path)
    return nb


def notebook_text(nb):
    """All stream output of an executed notebook, for lines the notebook prints about skipped parts."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


#################################################################################
#                                   Stages                                      #
#################################################################################


def train_command(norm, results_dir):
    """train_toy.py on all visible GPUs with the study's defaults, or the CPU preset without CUDA."""
    base = ["train_toy.py", "--norm", norm, "--results-dir", str(results_dir)]
    if not torch.cuda.is_available():
        return [sys.executable, *base, "--preset", "cpu"]
    # The study's global batch 2048 must split evenly: use the largest power-of-two number of GPUs.
    nproc = 2 ** (torch.cuda.device_count().bit_length() - 1)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *base]


def run_command(cmd):
    """Run a command in the repo root, output streamed; ReproduceError on failure."""
    print("$", shlex.join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise ReproduceError(f"command failed: {shlex.join(cmd)}")


def hardware(cpu_preset=False):
    """One line each: CPU model and cores, GPUs (cpu_preset: say the runs trained with it), torch and
    python versions."""
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
            f"GPU: {', '.join(gpus) if gpus else 'none'}{' (CPU preset)' if cpu_preset else ''}",
            f"torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}"]


def write_results(path, *, argv, stages, hw, out_dir, skipped, started):
    """res/results.md: numbers from the notebooks' tables, the commands, the hardware and the timings."""
    out_dir = Path(out_dir)

    def read(name):
        return (out_dir / name).read_text().strip() if (out_dir / name).is_file() else "(not written)"

    figures = [p.name + ("" if p.stat().st_mtime >= started else " (older file, not remade by this run)")
               for p in sorted(out_dir.glob("*.png"))]
    lines = [
        "# Reproduction results",
        "",
        f"Written by `{shlex.join(['python', 'reproduce.py', *argv])}` on "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}.",
        "",
        "## Hardware",
        "",
        *[f"- {h}" for h in hw],
        "",
        "## Stages",
        "",
        "| stage | command | wall time |",
        "|---|---|---:|",
        *[f"| {name} | `{cmd}` | {seconds:.0f} s |" for name, cmd, seconds in stages],
        f"| total | | {sum(s for _, _, s in stages):.0f} s |",
        "",
        "## Toy samples: |x| is the error (the data is exactly 0)",
        "",
        read("toydit_errors.md"),
        "",
        "## Residual-stream outliers (top-k |value| per block; massive: > 100 and >= 1000x the median)",
        "",
        read("token_outliers.md"),
        "",
        "## Figures",
        "",
        *[f"- {name}" for name in figures],
    ]
    if skipped:
        lines += ["", "## Skipped", "", *[f"- {s}" for s in skipped]]
    Path(path).write_text("\n".join(lines) + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-train", action="store_true", help="reuse the newest run folders; no training")
    p.add_argument("--layernorm-run", help="evaluate this run folder of train_toy.py --norm layernorm "
                   "instead of training one (with --none-run; no training, as with --skip-train)")
    p.add_argument("--none-run", help="the same for --norm none (with --layernorm-run)")
    p.add_argument("--steps", help="comma-separated checkpoint steps of the toy figures and table (default: "
                   "every step that both runs saved); the token figures use the last of them")
    p.add_argument("--results-dir", default="results", help="run folders of train_toy.py (default: results)")
    p.add_argument("--out-dir", default="res", help="figures and results.md (default: res)")
    p.add_argument("--pretrained", default="DiT-XL-2-256x256.pt",
                   help="checkpoint of the embedding figure: official name (downloaded) or path; '' skips it")
    p.add_argument("--num-sampling-steps", type=int, default=1000,
                   help="sampling steps of the toy figures (default: 1000, the full training schedule)")
    args = p.parse_args(argv)
    given = {"layernorm": args.layernorm_run, "none": args.none_run}
    if any(given.values()) and not all(given.values()):
        raise SystemExit("error: --layernorm-run and --none-run go together: give both or neither")
    wanted_steps = None
    if args.steps is not None:
        try:
            wanted_steps = sorted({int(step) for step in args.steps.split(",")})
        except ValueError:
            raise SystemExit(f"error: --steps {args.steps}: give comma-separated integers, e.g. 10000,50000"
                             ) from None
    results_dir, out_dir = Path(args.results_dir).resolve(), Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stages, skipped = [], []
    cpu_preset = False  # whether this command trained with train_toy.py's CPU preset
    try:
        runs = {}
        for norm in NORMS:
            if given[norm]:
                runs[norm] = Path(given[norm]).resolve()
                if not analysis.run_checkpoints(runs[norm]):
                    raise ReproduceError(f"--{norm}-run {given[norm]} holds no checkpoints/<step>.pt; pass a "
                                         "run folder of train_toy.py")
                try:  # a swapped pair fails here, not inside a notebook
                    load_model(analysis.checkpoint_at(runs[norm]), norm=norm)
                except CheckpointError as e:
                    raise ReproduceError(f"--{norm}-run {given[norm]}: {e}") from None
                continue
            if args.skip_train:
                runs[norm] = analysis.latest_run(results_dir, norm, TOY_MODEL)
                if runs[norm] is None:
                    raise ReproduceError(f"no {TOY_MODEL} run for norm={norm} in {results_dir}; "
                                         "run without --skip-train")
                continue
            cmd = train_command(norm, shown(results_dir))
            before = set(analysis.find_runs(results_dir, norm, TOY_MODEL))
            start = time.perf_counter()
            run_command(cmd)
            cpu_preset |= cmd[-2:] == ["--preset", "cpu"]
            seconds = time.perf_counter() - start
            stages.append((f"train norm={norm}", shlex.join(["python", *cmd[1:]]), seconds))
            # The folder this training created, not merely the newest (another launch may share the dir).
            new = set(analysis.find_runs(results_dir, norm, TOY_MODEL)) - before
            if len(new) != 1:
                raise ReproduceError(f"cannot tell which run folder train_toy.py created in {results_dir}")
            runs[norm] = new.pop()
        common = set.intersection(*(set(analysis.run_checkpoints(r)) for r in runs.values()))
        if not common:
            raise ReproduceError(f"runs {runs['layernorm']} and {runs['none']} share no checkpoint step")
        steps = sorted(common) if wanted_steps is None else wanted_steps
        if not set(steps) <= common:
            raise ReproduceError(f"--steps {args.steps}: not saved by both runs; they share {sorted(common)}")
        print(f"runs: {', '.join(shown(r) for r in runs.values())}; steps {steps}", flush=True)

        executed = results_dir / "notebooks"
        last = {norm: shown(analysis.checkpoint_at(run, steps[-1])) for norm, run in runs.items()}
        jobs = [
            ("ToyDiT_visualization.ipynb", dict(steps=steps, layernorm_run=shown(runs["layernorm"]),
                                                 none_run=shown(runs["none"]), out_dir=shown(out_dir),
                                                 num_sampling_steps=args.num_sampling_steps)),
            ("TokenEmbeddingsViz.ipynb", dict(checkpoint=args.pretrained, out_dir=shown(out_dir),
                                               toy_layernorm=last["layernorm"], toy_none=last["none"])),
        ]
        for name, params in jobs:
            print(f"executing {name} with {params}", flush=True)
            start = time.perf_counter()
            nb = execute_notebook(ROOT / name, params, executed / name)
            stages.append((f"notebook {name}", f"{name} with {params}", time.perf_counter() - start))
            skipped += [line for line in notebook_text(nb).splitlines() if line.startswith("SKIPPED")]
        write_results(out_dir / "results.md", argv=argv, stages=stages, hw=hardware(cpu_preset),
                      out_dir=out_dir, skipped=skipped, started=started)
    except (ReproduceError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out_dir / 'results.md'}")
    for line in skipped:
        print(line)


if __name__ == "__main__":
    main()
