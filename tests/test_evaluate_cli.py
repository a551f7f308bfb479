"""``python -m evaluate`` end to end on synthetic data, and its one-line errors."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from tests.helpers import REPO, assert_one_line_error

CONTRACT_KEYS = {"tar_at_far", "top1", "top5", "top10", "tpir_at_fpir"}
FAR_KEYS = ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    from model.backbones import get_model

    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    torch.save(get_model("r18", embedding_size=64).state_dict(), run / "model.pt")
    (run / "model.json").write_text(json.dumps({"network": "r18", "embedding_size": 64}))
    return run / "model.pt"


def test_ijbc_end_to_end_with_model_then_features(run_cli, synth_ijb, random_model, tmp_path):
    out, plot = tmp_path / "ijbc.json", tmp_path / "roc.png"
    result = run_cli("evaluate", "ijbc", "--root", synth_ijb, "--model", random_model,
                     "--device", "cpu", "--batch-size", "16", "--out", out, "--plot", plot,
                     "--open-set")
    assert result.returncode == 0, result.stderr
    assert "TAR (%) @ FAR" in result.stdout and "OPEN SET" in result.stdout
    metrics = json.loads(out.read_text())
    assert set(metrics) == CONTRACT_KEYS | {"open_set", "roc"}
    roc = metrics["roc"]  # the curve for `evaluate report`, consistent with tar_at_far
    assert len(roc["fpr"]) == len(roc["tpr"]) and roc["fpr"][0] == 1e-6
    assert roc["tpr"] == sorted(roc["tpr"])
    assert list(metrics["tar_at_far"]) == FAR_KEYS
    assert list(metrics["tpir_at_fpir"]) == ["0.01", "0.1"]
    assert all(0 <= v <= 1 for v in metrics["tar_at_far"].values())
    assert metrics["top1"] <= metrics["top5"] <= metrics["top10"] == 1.0  # 4 subjects
    assert plot.stat().st_size > 1000
    cache = random_model.parent / "ijbc_features.npy"
    assert np.load(cache).shape[1] == 64

    out2 = tmp_path / "again.json"
    again = run_cli("evaluate", "ijbc", "--root", synth_ijb, "--features", cache, "--out", out2)
    assert again.returncode == 0, again.stderr
    plain = {k: v for k, v in metrics.items() if k != "open_set"}
    assert json.loads(out2.read_text()) == plain


def test_lfw_style_bin_end_to_end(run_cli, random_model, tmp_path):
    path = tmp_path / "synth.bin"
    made = run_cli("evaluate", "synth-bin", "--out", path, "--identities", "5", "--pairs",
                   "10", "--first-identity", "900")
    assert made.returncode == 0, made.stderr
    out = tmp_path / "lfw.json"
    result = run_cli("evaluate", "lfw", "--bin", path, "--model", random_model,
                     "--device", "cpu", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "lfw: accuracy" in result.stdout
    metrics = json.loads(out.read_text())
    assert metrics["num_pairs"] == 10 and 0 <= metrics["accuracy_mean"] <= 1


def test_bin_with_other_content_is_refused(run_cli, random_model, tmp_path):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], [OrderedDict(x=1)])))
    result = run_cli("evaluate", "cfp_fp", "--bin", path, "--model", random_model)
    assert_one_line_error(result, "evil.bin", "refusing to load collections.OrderedDict")


@pytest.fixture
def ijb_copy(synth_ijb, tmp_path):
    root = tmp_path / "ijbc"
    shutil.copytree(synth_ijb, root)
    return root


def _features(root, rows=None):
    count = len((root / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines())
    path = root / "f.npy"
    np.save(path, np.random.default_rng(0).normal(size=(rows or count, 8)).astype(np.float32))
    return path


def test_missing_meta_file_is_named(run_cli, ijb_copy):
    features = _features(ijb_copy)
    (ijb_copy / "meta" / "ijbc_1N_probe_mixed.csv").unlink()
    result = run_cli("evaluate", "ijbc", "--root", ijb_copy, "--features", features)
    assert_one_line_error(result, "ijbc_1N_probe_mixed.csv: missing")


def test_features_with_wrong_row_count(run_cli, ijb_copy):
    features = _features(ijb_copy, rows=3)
    result = run_cli("evaluate", "ijbc", "--root", ijb_copy, "--features", features)
    assert_one_line_error(result, "f.npy: 3 feature rows", "ijbc_face_tid_mid.txt lists")


def test_bad_device_for_the_faiss_search(run_cli, ijb_copy):
    """Given features, --device still picks where faiss searches, so it is checked there."""
    result = run_cli("evaluate", "ijbc", "--root", ijb_copy, "--features", _features(ijb_copy),
                     "--device", "cuda:x")
    assert_one_line_error(result, "--device cuda:x: expected auto, cpu or cuda[:N]")


def test_template_in_pairs_without_images(run_cli, ijb_copy):
    features = _features(ijb_copy)
    with open(ijb_copy / "meta" / "ijbc_template_pair_label.txt", "a") as f:
        f.write("1 999 0\n")
    result = run_cli("evaluate", "ijbc", "--root", ijb_copy, "--features", features)
    assert_one_line_error(result, "ijbc_template_pair_label.txt", "template 999")


def test_landmarks_outside_the_image(run_cli, ijb_copy, random_model):
    path = ijb_copy / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = "5000.0"
    lines[1] = " ".join(fields)
    path.write_text("\n".join(lines) + "\n")
    result = run_cli("evaluate", "ijbc", "--root", ijb_copy, "--model", random_model,
                     "--device", "cpu", "--no-cache")
    assert_one_line_error(result, "2.jpg", "ijbc_name_5pts_score.txt:2", "outside")


def test_features_path_starts_without_torch(ijb_copy):
    """Scoring given features needs no network: importing torch would cost seconds."""
    features = _features(ijb_copy)
    code = ("import sys\nfrom evaluate.__main__ import main\n"
            f"assert main(['ijbc', '--root', {str(ijb_copy)!r}, '--features', "
            f"{str(features)!r}]) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
