"""The two notebooks, run headless (papermill) by make reproduce's report and by the tests."""

from pathlib import Path

from ditnorm import analysis

ROOT = Path(__file__).resolve().parent.parent


class NotebookError(Exception):
    """A notebook failed or was given a parameter it does not have; the message says which."""


def shown(path):
    """A path relative to the repo root when inside it (the notebooks run there), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def execute_notebook(path, parameters=None, executed_path=None, progress=False):
    """Run a notebook top to bottom in the repo root with papermill, its parameters cell overridden, the
    executed copy to executed_path; NotebookError with the failing cell's error on one line."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    parameters = {k: str(v) if isinstance(v, Path) else v for k, v in (parameters or {}).items()}
    unknown = set(parameters) - set(papermill.inspect_notebook(str(path)))
    if unknown:
        raise NotebookError(
            f"{Path(path).name} has no parameter {', '.join(sorted(unknown))}; check the names"
        )
    if executed_path is not None:
        Path(executed_path).parent.mkdir(parents=True, exist_ok=True)
    # A notebook takes minutes: say which one runs (and where its executed copy goes) before it starts.
    print(f"running notebook {Path(path).name}"
          + (f" -> {shown(executed_path)}" if executed_path is not None else ""), flush=True)
    try:
        return papermill.execute_notebook(
            str(path),
            executed_path and str(executed_path),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(ROOT),
            progress_bar=progress,
        )
    except PapermillExecutionError as e:
        where = f" (see {shown(executed_path)})" if executed_path is not None else ""
        raise NotebookError(f"{Path(path).name} failed: {e.ename}: {e.evalue}{where}") from None


def notebook_text(nb):
    """All stream output of an executed notebook, for lines the notebook prints about skipped parts."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def run_both(runs, out, executed, *, steps=None, pretrained="DiT-XL-2-256x256.pt", num_sampling_steps=1000):
    """Both notebooks on the run folders {"layernorm": run, "none": run}, figures and tables into out;
    the executed copies into `executed`. Returns the lines the notebooks print about what they skipped."""
    if sorted(runs) != ["layernorm", "none"] or not all(analysis.run_checkpoints(r) for r in runs.values()):
        return ["SKIPPED both notebooks: no run folders with checkpoints of layernorm and none (train first)"]
    steps = analysis.paired_steps(runs.values(), steps)
    pair = dict(layernorm_run=shown(runs["layernorm"]), none_run=shown(runs["none"]), out_dir=shown(out))
    jobs = [
        ("ToyDiT_visualization.ipynb", dict(pair, steps=steps, num_sampling_steps=num_sampling_steps)),
        ("TokenEmbeddingsViz.ipynb", dict(pair, checkpoint=pretrained, toy_step=steps[-1], mnist_dir="")),
    ]
    skipped = []
    for name, params in jobs:
        nb = execute_notebook(ROOT / name, params, Path(executed) / name)
        skipped += [line for line in notebook_text(nb).splitlines() if line.startswith("SKIPPED")]
    return skipped
