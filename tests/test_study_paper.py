"""The paper preset's report readers: a measured file it cannot read ends the report in one line."""

import json
import random

import numpy as np
import pytest

from ditnorm.studies import paper

ERRORS = "norm,seed,step,weights,median,p99,max,mean\nlayernorm,0,20,raw,0.1,0.2,0.3,0.1\n"
WHOLE = {"text": b"hello world\n", "noise": random.Random(0).randbytes(2048), "empty": b"",
         "json": json.dumps({"norm": "layernorm", "seed": 0}).encode(), "a folder": None}
ROWS = ["another table", "a short row", "a long row", "a word for a number", "an unknown weights kind"]
CASES = [(name, kind) for name in ("errors.csv", "weights.csv", "rms.csv", "perturb.csv") for kind in
         [*WHOLE, *ROWS] if not (name == "perturb.csv" and kind == "an unknown weights kind")]
CASES += [("pixels.npz", kind) for kind in WHOLE]


def damaged(name, kind):
    """The bytes of a bad runs/<run>/<name> (None: a folder in its place)."""
    if kind in WHOLE:
        return WHOLE[kind]
    columns = paper.COLUMNS[name.removesuffix(".csv")]
    if kind == "another table":
        other = "rms" if name == "errors.csv" else "errors"
        columns = paper.COLUMNS[other]
    cells = ["layernorm", "0", "20", "raw" if "weights" in columns else "random"]
    cells += ["1"] * (len(columns) - len(cells))
    row = {"a short row": cells[:-2], "a long row": [*cells, "9"],
           "a word for a number": [*cells[:-1], "big"],
           "an unknown weights kind": [*cells[:3], "ema_0.5", *cells[4:]]}.get(kind, cells)
    return f"{','.join(columns)}\n{','.join(cells)}\n{','.join(row)}\n".encode()


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.mark.parametrize("name, kind", CASES)
def test_a_bad_measured_file_is_one_line_and_nothing_is_written(tmp_path, name, kind):
    run = tmp_path / "runs" / "layernorm-seed0"
    run.mkdir(parents=True)
    (run / "errors.csv").write_text(ERRORS)
    np.savez(run / "pixels.npz", raw=np.zeros((2, 3), np.float32))
    bad, content = run / name, damaged(name, kind)
    bad.unlink(missing_ok=True)
    bad.mkdir() if content is None else bad.write_bytes(content)
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as e:
        options = {"runs": [("layernorm-seed0", {"seed": 0})], "preset": "paper"}
        paper.report("paper", tmp_path, options)
    message = str(e.value.code)
    assert "\n" not in message and message.startswith(f"experiment.py: error: cannot read {bad} "), message
    assert tree(tmp_path) == before
