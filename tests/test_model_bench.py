"""bench/heads.py runs end to end at toy size and ends with the promised JSON line."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def test_bench_heads_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.heads", "--n", "3000", "--batch-size", "16",
         "--dim", "32", "--steps", "1", "--warmup", "0", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(r["head"], r["n"]) for r in report["results"]] == [
        ("fc", 3000), ("partialfc", 3000), ("attfc", 3000), ("official", 3000)]
    for result in report["results"]:
        assert result["step_s"] > 0 and result["peak_mem_bytes"] is not None
        assert result["tf32"]  # the product's float32 policy, not a faster one
    assert {r["head"] for r in report["ratios"]} == {"partialfc", "attfc", "official"}
    assert [r["n"] for r in report["attfc_vs_official"]] == [3000]
