"""Models people already have: ONNX files, arcface_torch state dicts, fine-tuning with --init.

One tiny trained run (synthetic shards, a slim mbf, 3 steps) is the source of every model:
its model.pt, its ONNX exports (dynamic and fixed batch), an mxnet-style ONNX that takes raw
0-255 pixels, and a state dict saved the way arcface_torch saves one (``backbone.module``
of a DistributedDataParallel model). All of them must give the same features through
``python -m evaluate``, and the real ``insightface`` package must load our export.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from tests.helpers import (
    assert_ok,
    assert_one_line_error,
    run_module,
    tiny_train_args,
)

# the tests export small models with torch's TorchScript exporter, as model.export does
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TINY = tiny_train_args(batch_size=8, gamma=0.9)


@pytest.fixture(scope="module")
def run(synthetic_shards, tmp_path_factory):
    """A trained run (3 steps move the weights and the BatchNorm statistics)."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    assert_ok(run_module("train", "--shards", synthetic_shards, "--output", out, *TINY,
                         "--max-steps", "3", timeout=300))
    return out


def _evaluate(synth_ijb, model, out_dir, name, *extra):
    """IJB-C metrics and the per-image features (the cache) of one model, and the log."""
    out, cache = out_dir / f"{name}.json", out_dir / f"{name}_features.npy"
    done = assert_ok(run_module("evaluate", "ijbc", "--root", synth_ijb, "--model", model,
                                "--device", "cpu", "--batch-size", "16", "--cache", cache,
                                "--out", out, *extra))
    return json.loads(out.read_text()), np.load(cache), done.stderr


@pytest.fixture(scope="module")
def reference(run, synth_ijb):
    """The run's own model.pt through evaluate: (metrics, features)."""
    metrics, features, _ = _evaluate(synth_ijb, run / "model.pt", run, "pt")
    return metrics, features


@pytest.fixture(scope="module")
def exports(run):
    """``python -m model.export`` of the run, with a dynamic and a fixed batch of 1."""
    paths = {"dynamic": run / "dynamic.onnx", "batch1": run / "batch1.onnx"}
    assert_ok(run_module("model.export", run / "model.pt", "--onnx", paths["dynamic"], timeout=120))
    assert_ok(run_module("model.export", run / "model.pt", "--onnx", paths["batch1"],
                         "--fixed-batch", "1", timeout=120))
    return paths


def _flat(metrics):
    return {f"{group}/{key}": value for group in ("tar_at_far", "tpir_at_fpir")
            for key, value in metrics[group].items()} | {
        k: metrics[k] for k in ("top1", "top5", "top10")}


def _close(features, expected):
    np.testing.assert_allclose(features, expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["dynamic", "batch1"])
def test_onnx_export_gives_the_runs_ijb_metrics(reference, exports, synth_ijb, tmp_path, name):
    metrics, features, log = _evaluate(synth_ijb, exports[name], tmp_path, name)
    assert "(x - 127.5) / 127.5 (no Sub/Mul among the first nodes)" in log, log
    assert ("batch dynamic," if name == "dynamic" else "batch 1,") in log, log
    _close(features, reference[1])
    ours, theirs = _flat(metrics), _flat(reference[0])
    assert all(abs(ours[k] - theirs[k]) <= 1e-4 for k in theirs), (ours, theirs)


def test_fixed_batch_pads_the_last_batch(run, exports, tmp_path):
    from evaluate.onnx_model import OnnxEmbedder

    path = tmp_path / "batch5.onnx"
    assert_ok(run_module("model.export", run / "model.pt", "--onnx", path, "--fixed-batch", "5",
                         timeout=120))
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 112, 112), dtype=np.uint8)
    fixed = OnnxEmbedder(path, device="cpu")
    assert fixed.fixed_batch == 5
    _close(fixed(images, flip=True),
           OnnxEmbedder(exports["dynamic"], device="cpu")(images, flip=True))


def _raw_pixel_onnx(run, path):
    """An mxnet-converted style model: (x - 127.5) * (1/127.5) inside the graph, the first
    nodes named as mxnet's converter names them, so it takes raw 0-255 pixels."""
    from model.weights import load_backbone

    backbone = load_backbone(run / "model.pt")

    class RawInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = backbone

        def forward(self, x):
            return self.net((x - 127.5) * (1 / 127.5))

    torch.onnx.export(RawInput().eval(), (torch.zeros(2, 3, 112, 112),), str(path),
                      dynamo=False, input_names=["data"], output_names=["fc1"],
                      dynamic_axes={"data": {0: "n"}, "fc1": {0: "n"}})
    model = onnx.load(str(path))
    renamed = {"Sub": "_minus0", "Mul": "_mul0"}
    for node in model.graph.node[:8]:
        if node.op_type in renamed:
            node.name = renamed.pop(node.op_type)
    assert not renamed, "the export no longer starts with Sub and Mul"
    onnx.save(model, str(path))


def test_raw_pixel_onnx_is_detected_and_the_flag_overrides_it(run, synth_ijb, reference, tmp_path):
    from evaluate.onnx_model import OnnxEmbedder

    path = tmp_path / "mxnet_style.onnx"
    _raw_pixel_onnx(run, path)
    _, features, log = _evaluate(synth_ijb, path, tmp_path, "raw")
    assert "raw pixels 0-255 (first nodes subtract and multiply)" in log, log
    _close(features, reference[1])
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 112, 112), dtype=np.uint8)
    auto = OnnxEmbedder(path, device="cpu")
    forced = OnnxEmbedder(path, device="cpu", input_range="scaled")
    assert (auto.input_range, forced.input_range) == ("raw", "scaled")
    assert not np.allclose(auto(images, flip=False), forced(images, flip=False), rtol=1e-2)


def test_arcface_torch_state_dict_loads_with_network(tmp_path):
    """Saved as arcface_torch's train_v2.py saves model.pt: the DDP model's .module state."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from model.backbones import get_model

    torch.manual_seed(1)
    # a file rendezvous: a free port picked here could be taken by another test's store
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        backbone = DistributedDataParallel(get_model("mbf", embedding_size=512))
        torch.save(backbone.module.state_dict(), tmp_path / "backbone.pth")
        torch.save(backbone.state_dict(), tmp_path / "ddp_prefixed.pth")  # "module." keys
        expected = backbone.module.eval()
    finally:
        dist.destroy_process_group()
    assert_ok(run_module("evaluate", "synth-bin", "--out", tmp_path / "s.bin", "--identities",
                         "4", "--pairs", "10", "--first-identity", "700"))
    out = tmp_path / "lfw.json"
    assert_ok(run_module("evaluate", "lfw", "--bin", tmp_path / "s.bin", "--model",
                         tmp_path / "backbone.pth", "--network", "mbf", "--device", "cpu",
                         "--out", out))
    assert json.loads(out.read_text())["num_pairs"] == 10

    from model.weights import load_backbone

    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.inference_mode():
        for name in ("backbone.pth", "ddp_prefixed.pth"):
            torch.testing.assert_close(load_backbone(tmp_path / name, "mbf")(x), expected(x))
    assert_one_line_error(run_module("evaluate", "lfw", "--bin", tmp_path / "s.bin", "--model",
                               tmp_path / "backbone.pth", "--network", "r18"),
                    "backbone.pth: weights do not fit network r18", "missing key '",
                    "unexpected key '", "pass the right --network")


def test_wrong_or_mismatched_files_are_one_line_errors(run, synth_ijb, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a protobuf" * 20)
    assert_one_line_error(run_module("evaluate", "ijbc", "--root", synth_ijb, "--model", garbage),
                    "garbage.onnx: not an ONNX model")
    small = tmp_path / "small.onnx"  # a 96x96 attribute-style model, not a recognition one
    torch.onnx.export(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()),
                      (torch.zeros(1, 3, 96, 96),), str(small), dynamo=False)
    assert_one_line_error(run_module("evaluate", "ijbc", "--root", synth_ijb, "--model", small,
                               "--no-cache"), "small.onnx: input", "[1, 3, 96, 96]",
                    "expected [N, 3, 112, 112]")
    assert_one_line_error(run_module("evaluate", "ijbc", "--root", synth_ijb, "--model", small,
                               "--network", "r50"), "--network r50: an ONNX model carries")
    text = tmp_path / "model.pt"
    text.write_text("not weights")
    assert_one_line_error(run_module("evaluate", "ijbc", "--root", synth_ijb, "--model", text),
                    "model.pt: not a loadable PyTorch weights file")
    assert_one_line_error(run_module("evaluate", "ijbc", "--root", synth_ijb, "--model",
                                     run / "model.pt", "--network", "r18"),
                    "model.pt: weights do not fit network r18", "missing key 'conv1.weight'",
                    "unexpected key")


def test_insightface_routes_our_export_to_its_recognition_class(run, exports):
    """The real insightface package, as a user would call it, on our export."""
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    from model.weights import load_backbone

    model = get_model(str(exports["dynamic"]), providers=["CPUExecutionProvider"])
    assert isinstance(model, ArcFaceONNX) and model.taskname == "recognition"
    assert (model.input_mean, model.input_std, model.input_size) == (127.5, 127.5, (112, 112))
    rgb = np.random.default_rng(0).integers(0, 256, (6, 112, 112, 3), dtype=np.uint8)
    theirs = model.get_feat([image[..., ::-1] for image in rgb])  # insightface takes BGR
    backbone = load_backbone(run / "model.pt")
    with torch.inference_mode():
        x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1
        ours = backbone(x).numpy()
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs,
                                                                                     axis=1)
    assert cosine.min() >= 0.9999, cosine


def test_init_starts_from_a_runs_model_and_resume_keeps_the_checkpoint(run, synthetic_shards,
                                                                       tmp_path):
    from model.weights import load_backbone
    from train.__main__ import build_parser
    from train.config import resolve
    from train.loop import Trainer

    fine = tmp_path / "fine"
    args = build_parser().parse_args(["--shards", str(synthetic_shards), "--output", str(fine),
                                      *TINY, "--init", str(run / "model.pt"), "--max-steps", "2"])
    trainer = Trainer(resolve(args), resume=False)
    try:
        source = load_backbone(run / "model.pt")
        x = torch.rand(4, 3, 112, 112) * 2 - 1
        with torch.inference_mode():  # step 0: the same features as the source run's model
            assert torch.equal(trainer.backbone.eval()(x), source(x))
            assert torch.equal(trainer.head.class_encoder.eval()(x), source(x))
        assert all(torch.equal(v, trainer.backbone.state_dict()[k])
                   for k, v in source.state_dict().items())
    finally:
        trainer.loader.close()

    # As a user runs it: saved in config.toml; the resume reads only the checkpoint (the
    # init file may be gone by then).
    copy = tmp_path / "init.pt"
    copy.write_bytes((run / "model.pt").read_bytes())
    cli = tmp_path / "cli"
    assert_ok(run_module("train", "--shards", synthetic_shards, "--output", cli, *TINY,
                         "--init", copy, "--max-steps", "2", timeout=300))
    assert f"init = {json.dumps(str(copy))}" in (cli / "config.toml").read_text()
    copy.unlink()
    assert_ok(run_module("train", "--output", cli, "--resume", "--max-steps", "3", timeout=300))
    assert json.loads((cli / "model.json").read_text())["step"] == 3

    wrong = tmp_path / "wrong"
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    assert_one_line_error(run_module("train", "--shards", synthetic_shards, "--output", wrong,
                                     *TINY, "--init", tmp_path / "bad.pth", timeout=300),
                          "bad.pth: weights do not fit network mbf", "missing key",
                          "unexpected key 'conv1.weight'")


def test_onnx_provider_choice():
    from common.errors import UserError
    from evaluate.onnx_model import choose_providers

    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("cpu", gpu) == ["CPUExecutionProvider"]
    assert choose_providers("auto", gpu) == [("CUDAExecutionProvider", {"device_id": 0}),
                                             "CPUExecutionProvider"]
    assert choose_providers("cuda:1", gpu)[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="--device cuda: onnxruntime has no CUDA"):
        choose_providers("cuda", ["CPUExecutionProvider"])
