"""Run a gsm8k recipe and measure held-out accuracy: untrained, after the SFT warm start (step
0) and after GRPO; the measurement is ``examples/arithmetic/run.py``'s (any single-agent
config), run here on ``examples/gsm8k/cpu_tiny.yaml`` by default.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python examples/gsm8k/run.py [examples/gsm8k/cpu_tiny.yaml] \
        [key.sub=value ...] [--no-baseline]
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    if len(sys.argv) < 2 or not sys.argv[1].endswith((".yaml", ".yml")):
        sys.argv.insert(1, str(HERE / "cpu_tiny.yaml"))
    runpy.run_path(str(HERE.parent / "arithmetic" / "run.py"), run_name="__main__")
