"""bench.py runs, so that its table cannot rot between the GPU runs it is written for."""

import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_bench_table_on_cpu():
    """`python bench.py` (tiny models, CPU) prints one row a stage with our time, the peer's where
    there is one, their ratio and a peak memory. Catches: a bench broken by a change to the models
    or the sampler's signature, a ratio that is not ours over the peer's."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--repeats", "1"], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {m[0]: m[1:] for m in re.findall(r"^\| ([^|]+?) \| ([\d.]+) \| ([\d.-]+) \| ([\d.-]+) \| ([\d.]+) \|$",
                                            r.stdout, re.M)}
    assert list(rows) == ["vlm", "text", "refs", "dit", "dit, no refs", "vae", "answer (sum)", "sft_vdm step"], r.stdout
    for name, (ours, peer, ratio, gb) in rows.items():
        assert float(ours) > 0 and float(gb) > 0.1
        if peer != "-":
            assert float(ratio) == pytest.approx(float(ours) / float(peer), rel=0.05, abs=0.01)
    assert all(rows[k][1] == "-" for k in ("refs", "dit, no refs", "sft_vdm step"))  # no peer does these
    assert "sft_vdm step: " in r.stdout and "TFLOP" in r.stdout
