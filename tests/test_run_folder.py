"""The run folder's contract: its names, and reading config.toml, metrics.jsonl, model.json."""

from __future__ import annotations

import json

import pytest

from common.errors import UserError
from common.run_folder import (
    TRAIN_KIND,
    VAL_KIND,
    checkpoint_name,
    is_checkpoint_name,
    read_config,
    read_metrics,
    read_model_info,
)

TRAIN_1 = {"step": 1, "epoch": 0, "loss": 0.1 + 0.2, "lr": float("nan")}
TRAIN_2 = {"step": 2, "epoch": 0, "loss": None, "lr": 1e-05}
VAL_2 = {"step": 2, "epoch": 0, "kind": "val", "lfw": 0.5, "mean": 0.5}
TRAIN_3 = {"step": 3, "epoch": 1, "loss": 2.5, "lr": 0.1}


def _lines(*records: dict) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def test_metrics_records_in_order_and_by_kind(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_lines(TRAIN_1, TRAIN_2, VAL_2) + "\n"
                                            + _lines(TRAIN_3))
    records = read_metrics(tmp_path)
    assert [(r["step"], r.get("kind")) for r in records] == [(1, None), (2, None), (2, "val"),
                                                             (3, None)]
    assert records[0]["loss"] == 0.1 + 0.2 and records[1]["loss"] is None
    assert [r["step"] for r in read_metrics(tmp_path, TRAIN_KIND)] == [1, 2, 3]
    assert read_metrics(tmp_path, VAL_KIND) == [VAL_2]


@pytest.mark.parametrize("bad", ['{"step": 3, "lo', "5", "[1, 2]"])
def test_a_bad_metrics_line_is_an_error_naming_it_unless_live(tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(TRAIN_1, TRAIN_2) + bad + "\n" + _lines(TRAIN_3))
    with pytest.raises(UserError) as error:
        read_metrics(tmp_path)
    assert str(error.value) == f"{path}:3: not a JSON object"
    assert [r["step"] for r in read_metrics(tmp_path, live=True)] == [1, 2, 3]


def test_missing_metrics_is_an_error_unless_live(tmp_path):
    with pytest.raises(UserError) as error:
        read_metrics(tmp_path)
    assert str(error.value) == (f"{tmp_path / 'metrics.jsonl'}: not found (is {tmp_path} a "
                                "training run directory?)")
    assert read_metrics(tmp_path, live=True) == []


def test_resume_keeps_the_records_up_to_its_step_byte_for_byte(tmp_path):
    from train.metrics import MetricsLog

    kept = _lines(TRAIN_1, TRAIN_2, VAL_2)
    (tmp_path / "metrics.jsonl").write_text(kept + _lines(TRAIN_3) + '{"step": 4, "lo')
    MetricsLog(tmp_path, tensorboard=False, resume_step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text() == kept


def test_config_reads_back_and_names_what_is_wrong(tmp_path):
    with pytest.raises(UserError) as error:
        read_config(tmp_path)
    assert str(error.value) == f"{tmp_path}: no config.toml (not a training run folder)"
    assert read_config(tmp_path, missing_ok=True) == {}
    (tmp_path / "config.toml").write_text('head = "attfc"\nsample_rate = 0.3\nk = 2\n')
    assert read_config(tmp_path) == {"head": "attfc", "sample_rate": 0.3, "k": 2}
    (tmp_path / "config.toml").write_text("lr = \n")
    with pytest.raises(UserError) as error:
        read_config(tmp_path, missing_ok=True)
    assert str(error.value).startswith(f"{tmp_path / 'config.toml'}: not valid TOML (")


def test_noise_without_config_says_to_pass_shards(tmp_path):
    from evaluate.noise import analyse

    with pytest.raises(UserError) as error:
        analyse(tmp_path)
    assert str(error.value) == (f"{tmp_path}: no config.toml (not a training run folder); "
                                "pass --shards")


def test_model_info_beside_any_weights_file(tmp_path):
    assert read_model_info(tmp_path / "backbone.pth") == {}  # weights from elsewhere
    info = {"network": "mbf", "embedding_size": 64, "network_args": {"scale": 1}}
    (tmp_path / "model.json").write_text(json.dumps(info))
    assert read_model_info(tmp_path / "best.pt") == info
    (tmp_path / "model.json").write_text("[1]")
    with pytest.raises(UserError) as error:
        read_model_info(tmp_path / "model.pt")
    assert str(error.value) == f"{tmp_path / 'model.json'}: expected a JSON object"
    (tmp_path / "model.json").write_text("{")
    with pytest.raises(UserError) as error:
        read_model_info(tmp_path / "model.pt")
    assert str(error.value).startswith(f"{tmp_path / 'model.json'}: invalid JSON (")


def test_checkpoint_names():
    assert checkpoint_name(12) == "step-000000012.pt"
    assert is_checkpoint_name("step-000000012.pt")
    assert not is_checkpoint_name(".step-000000012.pt.tmp")  # being written
    assert not is_checkpoint_name("step-12.pt")
