"""`python -m evaluate report RUN`: the page and plots a person reads after a run."""

from __future__ import annotations

import json

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run, shards, ranks=1):
    """A run directory with the files train and evaluate write, with known numbers."""
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"num_identities": 2000}))
    run.mkdir()
    (run / "config.toml").write_text(
        f'head = "attfc"\nnetwork = "mbf"\nshards = "{shards}"\nsample_rate = 0.3\n'
        "batch_size = 32\n")
    rows = [{"step": s, "epoch": 0, "loss": 50.0 - s / 10, "lr": 0.1 * (1 - s / 300),
             "samples_per_s": 30.0 + s % 3, "images_per_s": 90.0, "attention_spread": 0.05,
             "spread_cos_mean": 0.3 + s / 1000, "spread_cos_median": 0.28 + s / 1000,
             "masked_conflicts": 2.0, "mem_bytes": 2**30, "global_batch": 32 * ranks}
            for s in range(10, 301, 10)]
    rows.insert(15, {"step": 150, "epoch": 0, "kind": "val", "synthetic_heldout": 0.70,
                     "mean": 0.70})
    rows.append({"step": 300, "epoch": 0, "kind": "val", "synthetic_heldout": 0.75,
                 "mean": 0.75})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval").mkdir()
    (run / "eval" / "ijbc.json").write_text(json.dumps({
        "tar_at_far": {"1e-06": 0.01, "1e-05": 0.02, "0.0001": 0.1234, "0.001": 0.2,
                       "0.01": 0.4, "0.1": 0.8},
        "top1": 0.5, "top5": 0.7, "top10": 0.8, "tpir_at_fpir": {"0.01": 0.1, "0.1": 0.3},
        "roc": {"fpr": np.logspace(-6, 0, 20).tolist(), "tpr": np.linspace(0, 1, 20).tolist()},
    }))
    (run / "eval" / "lfw.json").write_text(json.dumps({"accuracy_mean": 0.9912,
                                                       "accuracy_std": 0.003}))


def test_report_table_and_plots(run_cli, tmp_path):
    run = tmp_path / "run"
    _write_run(run, tmp_path / "shards")
    result = run_cli("evaluate", "report", run)
    assert result.returncode == 0, result.stderr
    report = (run / "report.md").read_text()
    # paper-format row: W-size = floor(0.3 * 2000 / 32) * 32 = 576, LFW from eval/lfw.json,
    # IJB-C TAR@FAR=1e-4 in percent, peak memory, median samples/s
    assert "| method | W-size | LFW | CFP-FP | AgeDB | IJB-B | IJB-C | memory | samples/s |" \
        in report.splitlines()
    row = next(line for line in report.splitlines() if line.startswith("| attfc (mbf)"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells == ["attfc (mbf)", "576", "99.12", "–", "–", "–", "12.34", "1.00 GiB", "31"]
    assert "synthetic_heldout** (validation .bin at step 300) accuracy 75.00 %" in report
    for name in ("loss_lr", "throughput", "attention_spread", "embedding_spread", "validation",
                 "roc"):
        png = run / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        assert f"(report/{name}.png)" in report


def test_w_size_of_a_multi_gpu_attfc_run_is_of_the_global_batch(tmp_path):
    from evaluate.report import load_run, results_table

    run = tmp_path / "run"
    _write_run(run, tmp_path / "shards", ranks=4)  # --batch-size 32 on 4 GPUs
    row = results_table(load_run(run)).splitlines()[-1]
    # S = floor(0.3 * 2000 / 128) * 128 = 512 (the per-GPU batch would give 576)
    assert row.split("|")[2].strip() == "512"


def test_report_on_a_directory_without_metrics_is_one_line(run_cli, tmp_path):
    result = run_cli("evaluate", "report", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"evaluate: error: {tmp_path / 'metrics.jsonl'}: not found (is {tmp_path} a training "
        "run directory?)"]

