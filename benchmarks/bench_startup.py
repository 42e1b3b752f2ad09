"""Where the seconds before train_toy.py's first step go: Python start and imports, then set-up.

    python benchmarks/bench_startup.py                    # ToyDiT/1 on this machine's default device
    python benchmarks/bench_startup.py --device cuda      # the GPU: start-up before compilation

Runs `train_toy.py --max-steps 1` as a fresh process and reads, from Linux's /proc, how long that process
had lived when its first log line came, against the seconds its imports took (python -X importtime).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def seconds_since_process_start():
    """Seconds since this process started, from Linux's /proc; None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # from field 3 (state) on
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except (OSError, ValueError, IndexError):
        return None


def import_seconds():
    """Seconds a fresh interpreter spends importing train_toy (python -X importtime, cumulative)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import train_toy"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    total = [int(m.group(1)) for m in re.finditer(r"\|\s*(\d+)\s*\|\s*train_toy$", proc.stderr, re.M)]
    return total[-1] / 1e6 if total else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="passed to train_toy.py (default: its own default)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "train_toy.py", "--max-steps", "1", "--log-every", "1", "--results-dir", tmp]
        cmd += ["--device", args.device] if args.device else []
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        total = time.perf_counter() - start
    imports = import_seconds()
    print(f"train_toy.py --max-steps 1: {total:.1f} s in all; importing train_toy alone: {imports:.1f} s; "
          f"the rest (interpreter start, device, model, step, one step, one save): {total - imports:.1f} s")


if __name__ == "__main__":
    main()
