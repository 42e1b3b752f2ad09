"""The files an experiment writes and reads: every write is atomic (a temporary file, then os.replace);
read_rows is the one reader of measured rows, gather a record's; grouped and seed_spread group them."""

import csv
import io
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from ditnorm import layout


def first_line(error):
    """'<type>: <first line of its message>' of an exception (PyTorch's messages run to paragraphs)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _umask():
    """The process's umask (os has no getter: set it and put it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The temporary file of a write names its process: .<name>.<pid>.<random>.tmp (older ones: no pid).
_TEMP = re.compile(r"^\..+?\.(?:(\d+)\.)?[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temps(folder):
    """Delete the temporary files that writes killed mid-way left in folder (their process is gone)."""
    for tmp in Path(folder).glob(".*.tmp"):
        match = _TEMP.match(tmp.name)
        if not match:
            continue
        pid = int(match.group(1)) if match.group(1) else None
        if pid is not None and pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # its writer still runs
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError):
                continue
        tmp.unlink(missing_ok=True)


def temp_file(folder, name, suffix):
    """(fd, path) of a new temporary file in folder, named after this process, with the permissions of a
    plain open(): 0666 & ~umask (mkstemp's are 0600, which made checkpoints unreadable to the group while
    the logs were 0644)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.{os.getpid()}.", suffix=suffix)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def write_atomic(path, data):
    """Write text, bytes, or what data(file) writes into a binary file, to path: a temporary file in its
    folder, fsync, os.replace, so that path is the old file or the new one whole, never a part. The
    temporary files that earlier writes killed mid-way left in the folder are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp = temp_file(path.parent, path.name, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # no truncated file under the real name, no litter
        raise


def savefig_atomic(fig, path, **kwargs):
    """fig.savefig into memory, then write_atomic (the format from path's suffix)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix[1:], **kwargs)
    write_atomic(path, buffer.getvalue())


# The columns that hold names, not numbers, in every measured file of the repository.
TEXT = ("data", "measure", "norm", "weights", "tensor", "direction", "group", "quantity", "model",
        "intervention", "statistic", "run")


class RowsError(ValueError):
    """A measured file that cannot be read as rows: `path` and `reason` (the message names both)."""

    def __init__(self, path, reason, sep=": "):
        super().__init__(f"{path}{sep}{reason}")
        self.path, self.reason = path, reason


def read_rows(path, columns=(), exact=False, ints=None, text=TEXT, known=None):
    """The rows of a csv as dicts; [] when nothing is at path. With `ints`, a column in `text` stays a
    string, one in `ints` is an int, any other a float; columns: names the header must hold (exactly, in
    order, when exact); known: {column: the values it may hold}. A file that is no such csv (unreadable, a
    missing column, a ragged line, a cell that is no number, an unknown value) is a RowsError naming it."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = tuple(reader.fieldnames or ())
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:  # foreign bytes, a folder in the file's place
        raise RowsError(path, f"cannot be read ({first_line(e)})", " ") from None
    if not header:
        raise RowsError(path, "is empty (not even a header)", " ")
    if exact and header != tuple(columns):
        raise RowsError(path, f"has the columns {list(header)}, not {list(columns)}", " ")
    lacking = [c for c in columns if c not in header]
    if lacking:
        raise RowsError(path, f"has no {', '.join(lacking[:3])} column", " ")
    for i, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise RowsError(path, f"line {i} has {'more' if None in row else 'fewer'} cells than the header")
        foreign = " and ".join(f"{k} {row[k]!r}" for k, allowed in (known or {}).items()
                               if k in row and row[k] not in allowed)
        if foreign:
            raise RowsError(path, f"line {i} has {foreign}, which this preset does not measure")
    if ints is None:
        return rows
    try:
        return [{k: v if k in text else int(v) if k in ints else float(v) for k, v in row.items()}
                for row in rows]
    except ValueError as e:
        raise RowsError(path, e) from None


def gather(record, name, **kwargs):
    """Every run's rows of <record>/runs/<run>/<name>.csv (read_rows' kwargs), runs in name order."""
    return [row for path in layout.measured_files(record, f"{name}.csv")
            for row in read_rows(path, **kwargs)]


def csv_text(rows, fieldnames=None, lineterminator="\r\n"):
    """The rows as csv text, with a header (fieldnames: the first row's keys by default)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fieldnames or list(rows[0]), lineterminator=lineterminator)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_rows(path, rows, key=None):
    """All rows to a csv atomically, sorted by key (stable) when given; nothing is written for no rows."""
    if rows:
        write_atomic(path, csv_text(sorted(rows, key=key) if key else rows))


def seed_spread(values):
    """(median, min, max) over seeds of the finite values; nan if there are none."""
    v = np.asarray([np.nan if x is None else x for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    return (float(np.median(v)), float(v.min()), float(v.max())) if v.size else (np.nan,) * 3


def grouped(rows, *keys):
    """{(values of keys): [rows]} in first-seen order."""
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups
