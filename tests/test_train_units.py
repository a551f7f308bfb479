"""train's pieces that need no data: settings, checkpoints, schedule, prefetch, ONNX export."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from common.errors import UserError
from common.files import WriteError
from train import checkpoint as ckpt
from train.__main__ import build_parser
from train.config import DEFAULTS, load_toml, resolve, to_toml
from train.prefetch import Prefetcher
from train.schedule import lr_at


def _resolve(argv):
    return resolve(build_parser().parse_args(argv))


def test_config_precedence_defaults_toml_flags(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    toml = tmp_path / "run.toml"
    toml.write_text(f'shards = "{shards}"\nlr = 0.02\nbatch-size = 64\nhead = "fc"\n')
    config = _resolve(["--config", str(toml), "--lr", "0.5"])
    assert config["lr"] == 0.5  # flag beats file
    assert config["batch_size"] == 64 and config["head"] == "fc"  # file beats default
    assert config["epochs"] == DEFAULTS["epochs"] == 5 and config["k"] == 2  # paper default
    saved = tmp_path / "saved.toml"
    saved.write_text(to_toml(config))
    assert load_toml(saved) == config  # the saved effective config reads back unchanged


def test_resume_keeps_the_margin_settings(tmp_path):
    """--margin-args compare as JSON objects (spacing and key order do not count)."""
    shards, run = tmp_path / "shards", tmp_path / "run"
    shards.mkdir()
    run.mkdir()
    saved = _resolve(["--shards", str(shards), "--output", str(run), "--margin", "adaface",
                      "--margin-args", '{"h": 0.5, "m": 0.3}'])
    (run / "config.toml").write_text(to_toml(saved))
    same = _resolve(["--output", str(run), "--resume", "--margin-args", '{"m":0.3,"h":0.5}'])
    assert same["margin"] == "adaface"
    with pytest.raises(UserError, match=r"--margin-args .* -> \{\"h\": 0.4\}"):
        _resolve(["--output", str(run), "--resume", "--margin-args", '{"h": 0.4}'])
    with pytest.raises(UserError, match=r"--margin-m2 0\.3 -> 0\.1"):
        _resolve(["--output", str(run), "--resume", "--margin-m2", "0.1"])


@pytest.mark.parametrize("text, message", [
    ("nope = 1\n", "unknown setting 'nope'"),
    ('lr = "fast"\n', "expected float"),
    ('head = "softmax"\n', "expected one of"),
    ("lr = \n", "not valid TOML"),
])
def test_bad_toml_names_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as error:
        load_toml(path)
    assert "bad.toml" in str(error.value)


def test_deterministic_help_says_which_heads_it_covers():
    """fc/partialfc's NLLLoss has no deterministic CUDA kernel: --help must not promise it."""
    text = " ".join(build_parser().format_help().split())
    assert "attfc only: fc and partialfc stay non-deterministic on CUDA" in text


def test_checkpoint_roundtrip_keep_and_rng(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = {"w": torch.randn(3), "rng": ckpt.rng_state("cpu"), "position": {"step": 1}}
    expected = (torch.rand(2), np.random.rand(), random.random())
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, state, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000000004.pt",
                                                                  "step-000000003.pt"]
    _, loaded = ckpt.latest_checkpoint(tmp_path)  # weights_only=True load
    ckpt.set_rng_state(loaded["rng"], "cpu")
    assert torch.equal(torch.rand(2), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(tmp_path, 10, {"w": torch.ones(4)}, keep=3)

    def dies_half_way(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", dies_half_way)
    with pytest.raises(WriteError, match=r"step-000000020\.pt: disk full"):
        ckpt.save_checkpoint(tmp_path, 20, {"w": torch.zeros(4)}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # no temp left behind
    path, state = ckpt.latest_checkpoint(tmp_path)
    assert path == good and torch.equal(state["w"], torch.ones(4))


def test_corrupt_newest_checkpoint_is_skipped(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, keep=3)
    (tmp_path / "step-000000002.pt").write_bytes(b"truncated")
    path, _ = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "step-000000001.pt"


def test_schedule_warmup_then_cosine():
    lrs = [lr_at(s, total_steps=100, base_lr=0.1, warmup_steps=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1) and lrs[55] == pytest.approx(0.05)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:])) and lrs[-1] < 1e-3
    assert lr_at(0, total_steps=100, base_lr=0.1) == pytest.approx(0.1)  # no warmup


def test_prefetcher_order_errors_and_early_exit():
    with Prefetcher(range(50), depth=2) as items:
        assert list(items) == list(range(50))

    def broken():
        yield 1
        raise ValueError("bad shard")

    with Prefetcher(broken()) as items, pytest.raises(ValueError, match="bad shard"):
        list(items)
    with Prefetcher(iter(range(10**9)), depth=2) as items:  # leaving early must not hang
        assert next(iter(items)) == 0


def test_onnx_export_matches_pytorch(tmp_path):
    from model.backbones import get_model
    from model.export import export_onnx, max_difference

    torch.manual_seed(0)
    backbone = get_model("mbf", embedding_size=64)
    path = tmp_path / "model.onnx"
    export_onnx(backbone, path)
    assert max_difference(backbone, path, batch_sizes=(1, 3)) < 1e-4


def test_nonfinite_step_is_skipped_on_the_device():
    """A NaN loss leaves weights and momentum untouched and is counted; a finite one trains."""
    from types import SimpleNamespace

    from model.backbones import get_model
    from model.heads import build_head
    from model.margins import build_margin
    from train.step import TrainStep, make_optimizer

    torch.manual_seed(0)
    backbone = get_model("mbf", embedding_size=32, blocks=(1, 1, 1, 1), scale=1)
    head = build_head("fc", num_classes=5, embedding_size=32, batch_size=4,
                      margin=build_margin("arcface"))
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = make_optimizer(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    step = TrainStep(backbone, head, optimizer, device="cpu", precision="fp32",
                     channels_last=False)
    batch = SimpleNamespace(identity=torch.randint(0, 256, (4, 3, 112, 112), dtype=torch.uint8),
                            classes=None, labels=torch.tensor([0, 1, 2, 3]))

    def snapshot():
        return [p.detach().clone() for p in params] + [
            optimizer.state[p]["momentum_buffer"].clone() for p in params]

    before = snapshot()
    step(batch, lr=0.1, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))
    assert int(step.nonfinite_total) == 1 and int(step.nonfinite_in_row) == 1
    step(batch, lr=0.1)
    assert not torch.equal(before[0], params[0]) and int(step.nonfinite_in_row) == 0
    assert step.read_loss() > 0


def test_step_feeds_images_in_the_compute_dtype():
    """Under bf16 the feature and class encoders get bf16 images (no fp32 copy first)."""
    from types import SimpleNamespace

    from model.backbones import get_model
    from model.heads import build_head
    from model.margins import build_margin
    from train.step import TrainStep, make_optimizer

    torch.manual_seed(0)
    backbone = get_model("mbf", embedding_size=16, blocks=(1, 1, 1, 1), scale=1)
    head = build_head("attfc", feature_encoder=backbone, num_classes=4, embedding_size=16,
                      batch_size=2, margin=build_margin("arcface"), k=2)
    seen = []
    for encoder in (backbone, head.class_encoder):
        encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    params = [*backbone.parameters(), *head.parameters()]
    step = TrainStep(backbone, head, make_optimizer(params, lr=0.1, momentum=0.9,
                                                    weight_decay=5e-4),
                     device="cpu", precision="bf16", channels_last=False)
    step(SimpleNamespace(identity=torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8),
                         classes=torch.randint(0, 256, (2, 2, 3, 112, 112), dtype=torch.uint8),
                         labels=torch.tensor([0, 1]), class_image_ids=None), lr=0.1)
    assert seen == [torch.bfloat16, torch.bfloat16]


def test_synthetic_shards_get_a_heldout_validation_set(tmp_path):
    import json

    from evaluate.verification import load_bin
    from train.validate import synthetic_heldout

    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {"source": "synthetic", "num_identities": 7,
                "source_info": {"identities": 7, "seed": 3}}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    val_dir = synthetic_heldout(shards, tmp_path / "run", identities=4, pairs=10)
    images, issame = load_bin(val_dir / "synthetic_heldout.bin")
    assert images.shape == (20, 3, 112, 112) and issame.sum() == 5
    (shards / "manifest.json").write_text(json.dumps({**manifest, "source": "folder"}))
    assert synthetic_heldout(shards, tmp_path / "other") is None


@pytest.mark.parametrize("device, current", [("cuda:1", ["cuda:1"]), ("cuda", []), ("cpu", [])])
def test_one_process_on_cuda_n_makes_it_the_current_device(monkeypatch, device, current):
    """--device cuda:N without torchrun: cuda:N becomes the main thread's current device, so
    CUDA calls that name no device do not open a context on GPU 0. No GPU here: torch.cuda's
    is_available and set_device are stand-ins; bench/gpu_check.py runs it on a GPU."""
    from train.distributed import _LAUNCH_VARIABLES, init_world

    for name in _LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    world, resolved = init_world(device, 60)
    assert resolved == device and not world.launched and chosen == current
