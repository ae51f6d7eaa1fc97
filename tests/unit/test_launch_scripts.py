"""The entry scripts stay light at import: multiprocessing re-imports the main script.

The reward pool's workers start from a fork server, which imports the parent's main module
(as ``__mp_main__``) before it forks them; a script that imports the trainer at its top makes
every fork server and worker load torch, megatron-core and vLLM (seconds and ~0.5 GB each).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["launch/train.py", "launch/sft.py"])
def test_importing_an_entry_script_as_mp_main_loads_nothing_heavy(script):
    code = (
        "import runpy, sys\n"
        f"runpy.run_path({str(REPO / script)!r}, run_name='__mp_main__')\n"
        "print(sorted({'torch', 'megatron', 'vllm', 'dapo_megatron'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"{script} imports {out.stdout.strip()} outside its main guard"
