"""How fast the command line answers: ``--help`` and argument errors, against importing the library.

The CLI parses before it imports torch, timm or ``certify_fx`` (it installs as ``certify_fx_cli``),
so help and usage errors should take tens of milliseconds; a command that runs imports what it
needs. Each case runs as a fresh process, interleaved, and the table prints median wall-clock
seconds and the ratio to ``python -c "import certify_fx"`` measured in the same run.

    python benchmarks/cli_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median  # noqa: E402


def _command() -> list[str]:
    script = Path(sys.executable).with_name("certify-fx")
    return [str(script)] if script.exists() else [shutil.which("certify-fx") or "certify-fx"]


CASES = {
    "certify-fx --help": ["--help"],
    "certify-fx train --help": ["train", "--help"],
    "certify-fx train --no-such-flag": ["train", "--no-such-flag"],
    "certify-fx bound (missing MODEL)": ["bound"],
    "certify-fx --version": ["--version"],
}


def _seconds(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    base = _command()
    commands = {name: base + argv for name, argv in CASES.items()}
    commands['python -c "import certify_fx" (reference)'] = [sys.executable, "-c", "import certify_fx"]
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every case alike
        for name, cmd in commands.items():
            times[name].append(_seconds(cmd))
    reference = median(times['python -c "import certify_fx" (reference)'])
    table = Table(title=f"command-line start-up, median of {args.repeats} fresh processes")
    for col in ("command", "seconds", "x library import"):
        table.add_column(col, justify="left" if col == "command" else "right")
    for name, values in times.items():
        table.add_row(name, f"{median(values):.3f}", f"{median(values) / reference:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
