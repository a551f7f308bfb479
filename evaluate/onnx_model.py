"""ONNX recognition models (insightface's model zoo, ``python -m model.export``) on onnxruntime.

A model takes float NCHW [N,3,112,112] RGB and returns one [N,D] embedding. Which pixel
scale it expects is decided as insightface's ONNX loader decides it: models converted from
mxnet subtract the mean and multiply by the scale inside the graph, so a ``Sub``/``_minus``
and a ``Mul``/``_mul`` node among the first eight mean raw 0-255 input; any other model
takes (x - 127.5) / 127.5 in [-1, 1]. A fixed batch size (some exports fix it, often at 1)
is honoured by feeding the model that many images at a time, the last batch padded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from common.alignment import ALIGNED_SIZE
from common.errors import UserError, first_line

log = logging.getLogger("evaluate.onnx")

# --onnx-input: detect; raw 0-255 pixels; scaled to [-1, 1] as (x - 127.5) / 127.5
INPUT_RANGES = ("auto", "raw", "scaled")
FIRST_NODES = 8  # how many leading graph nodes insightface inspects


def detect_input_range(graph) -> str:
    """``raw`` (0-255) when the first nodes include a subtraction and a multiplication."""
    names = [node.name for node in graph.node[:FIRST_NODES]]
    sub = any(name.startswith(("Sub", "_minus")) for name in names)
    mul = any(name.startswith(("Mul", "_mul")) for name in names)
    return "raw" if sub and mul else "scaled"


def choose_providers(device: str, available: list[str]) -> list[str]:
    """CUDA first when present (``auto``) or asked for (``cuda``), CPU otherwise."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto" or device.startswith("cuda"):
        if "CUDAExecutionProvider" in available:
            device_id = device.partition(":")[2] or "0"
            return [("CUDAExecutionProvider", {"device_id": int(device_id)}),
                    "CPUExecutionProvider"]
        if device != "auto":
            raise UserError(f"--device {device}: onnxruntime has no CUDAExecutionProvider "
                            f"here (available: {', '.join(available)})")
        return ["CPUExecutionProvider"]
    raise UserError(f"--device {device}: expected auto, cpu or cuda[:N]")


class OnnxEmbedder:
    """uint8 [B,3,112,112] RGB -> float32 [B,D] (+ the mirror's when flipped) via onnxruntime."""

    def __init__(self, path: Path | str, *, device: str = "auto", input_range: str = "auto"
                 ) -> None:
        import onnx

        try:
            import onnxruntime
        except ImportError:
            raise UserError(f"{path}: ONNX models run on onnxruntime, which is not installed: "
                            "pip install onnxruntime (onnxruntime-gpu for CUDA)") from None
        self.path = Path(path)
        if input_range not in INPUT_RANGES:
            raise UserError(f"--onnx-input {input_range}: expected one of "
                            f"{', '.join(INPUT_RANGES)}")
        try:
            graph = onnx.load(str(self.path), load_external_data=False).graph
        except Exception as error:  # protobuf raises its own DecodeError, among others
            raise UserError(f"{self.path}: not an ONNX model ({first_line(error)})") from None
        detected = detect_input_range(graph)
        self.input_range = detected if input_range == "auto" else input_range
        providers = choose_providers(device, onnxruntime.get_available_providers())
        if providers[0] != "CPUExecutionProvider" and hasattr(onnxruntime, "preload_dlls"):
            onnxruntime.preload_dlls()  # finds the CUDA/cuDNN libraries pip installed for torch
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=providers)
        except Exception as error:  # onnxruntime's own exception types
            raise UserError(f"{self.path}: onnxruntime cannot load it "
                            f"({first_line(error)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"{self.path}: {len(inputs)} inputs and {len(outputs)} outputs; a "
                            "recognition model has one image input and one embedding output")
        shape = list(inputs[0].shape)
        if len(shape) != 4 or shape[1:] != [3, ALIGNED_SIZE, ALIGNED_SIZE]:
            raise UserError(f"{self.path}: input {inputs[0].name!r} has shape {shape}; "
                            f"expected [N, 3, {ALIGNED_SIZE}, {ALIGNED_SIZE}] (NCHW)")
        if inputs[0].type != "tensor(float)":
            raise UserError(f"{self.path}: input {inputs[0].name!r} is {inputs[0].type}; "
                            "expected tensor(float)")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        why = ("set by --onnx-input" if input_range != "auto" else
               "first nodes subtract and multiply" if detected == "raw" else
               "no Sub/Mul among the first nodes")
        log.info("%s: ONNX input %s (%s), batch %s, %s", self.path,
                 "raw pixels 0-255" if self.input_range == "raw" else "(x - 127.5) / 127.5",
                 why, self.fixed_batch or "dynamic",
                 self.session.get_providers()[0].removesuffix("ExecutionProvider"))

    def __call__(self, batch: np.ndarray, *, flip: bool) -> np.ndarray:
        x = np.asarray(batch, dtype=np.float32)
        if self.input_range == "scaled":
            x = x / np.float32(127.5) - np.float32(1.0)  # as model.backbones.normalize_images
        features = self._run(x)
        if flip:
            features = features + self._run(x[..., ::-1])
        return features

    def _run(self, x: np.ndarray) -> np.ndarray:
        step = self.fixed_batch or len(x)
        chunks = []
        for start in range(0, len(x), step):
            part = np.ascontiguousarray(x[start:start + step])
            count = len(part)
            if count < step:  # a fixed-batch model needs full batches: pad, then drop
                part = np.concatenate([part, np.zeros((step - count, *part.shape[1:]),
                                                      np.float32)])
            (out,) = self.session.run([self.output_name], {self.input_name: part})
            if out.ndim != 2 or len(out) != step:
                raise UserError(f"{self.path}: output {self.output_name!r} has shape "
                                f"{list(out.shape)} for a batch of {step}; expected [N, D]")
            chunks.append(out[:count])
        return np.concatenate(chunks).astype(np.float32, copy=False)
