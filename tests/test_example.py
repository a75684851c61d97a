"""The README's main job, end to end through Inductor, on a machine without Triton."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_main_job_runs_without_triton():
    code = (
        "import sys, runpy; sys.modules['triton'] = None; "  # import triton now fails
        f"sys.argv = ['tiny_onn_sbl.py']; runpy.run_path({str(ROOT / 'examples' / 'tiny_onn_sbl.py')!r}, run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rewritten sites: sbl=2" in out.stdout
    assert "compiled == eager" in out.stdout
