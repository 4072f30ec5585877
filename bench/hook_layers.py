"""The hook-layer sweep: edit hand-written facts at each candidate layer and measure efficacy, paraphrase
success, neighbour stability, gate recall and hard-negative fires, and compute time (testkit/hook_layers.py).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/hook_layers.py --layers 2 3 4 5 6 7 8 10
    HF_HUB_OFFLINE=1 .venv/bin/python bench/hook_layers.py --model DIR --device cuda --dtype bfloat16
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit.hook_layers import main  # noqa: E402

if __name__ == "__main__":
    main()
