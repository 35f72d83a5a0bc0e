"""Inference runtimes for the ``cnn`` extractor: torch, OpenVINO and ONNX Runtime, at fp32, bf16 or int8.

Every runtime runs the same :class:`DescribingNetwork` (grey (B, H, W) in [0, 1] -> raw descriptors (B, D)), so the
input normalisation and the stage pooling are compiled with the backbone. Converted models are produced from the
extractor's own weights and cached on disk by the sha256 of those weights (``CBMIR_CACHE_DIR``, default
``~/.cache/cbmir``): a server converts once per weights, never per request. int8 models are quantised after training
with ONNX Runtime's static quantiser (QDQ, per-channel weights) on archive images and stored in the bundle, because
the calibration images are not at hand where the bundle is served.

Measured on this 2-core CPU (AMD EPYC, AVX-512 with bf16 and VNNI), tf_efficientnet_lite0 at 128 px, batch 16:
torch eager fp32 about 140 img/s, ONNX Runtime fp32 about 320, OpenVINO fp32 about 500, OpenVINO bf16 about 790,
OpenVINO int8 about 500 (benchmarks/results/throughput.json holds the figures of record). fp32 runtimes agree with
torch within 3e-5; on 200 UNIFESP radiographs the top-10 neighbours of bf16 agree with fp32 torch at 0.92 and of
int8 (OpenVINO) at 0.81, and ONNX Runtime's int8 kernels only at 0.57, so ONNX Runtime is offered at fp32 only.
``auto`` therefore means OpenVINO fp32 on CPU and torch on CUDA.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import queue
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import torch

from cbmir.defaults import PRECISIONS, RUNTIME_CHOICES
from cbmir.errors import InvalidInputError

log = logging.getLogger(__name__)

CACHE_ENV = "CBMIR_CACHE_DIR"


def normalise_grey(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, H, W) grey in [0, 1] -> (B, 3, H, W) normalised by the backbone's mean and std (each (1, 3, 1, 1))."""
    return (images.unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std


def pool_features(net: torch.nn.Module, x: torch.Tensor, multi_stage: bool) -> torch.Tensor:
    """Raw descriptors (B, D_raw): the backbone's pooled output, or its stages' pooled, L2-normalised maps joined."""
    if not multi_stage:
        return net(x)
    maps = net(x)
    return torch.cat([torch.nn.functional.normalize(m.float().mean(dim=(2, 3)), dim=1) for m in maps], dim=1)


class DescribingNetwork(torch.nn.Module):
    """What every runtime runs: grey images (B, H, W) float32 in [0, 1] -> raw descriptors (B, D_raw) float32."""

    def __init__(
        self, net: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor, multi_stage: bool, signature: str
    ) -> None:
        """``signature`` names the architecture and outputs (model, stages); it keys the cache with the weights."""
        super().__init__()
        self.net = net
        self.signature = signature
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())
        self.multi_stage = multi_stage

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        x = normalise_grey(grey, self.mean, self.std).contiguous(memory_format=torch.channels_last)
        return pool_features(self.net, x, self.multi_stage).float()


def available_runtimes() -> list[str]:
    """Runtimes whose package is installed (torch always is)."""
    return ["torch"] + [name for name in ("openvino", "onnxruntime") if importlib.util.find_spec(name) is not None]


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """Map ``auto`` to the fastest runtime measured for the device; check an explicit one is usable.

    Raises:
        InvalidInputError: unknown runtime, its package missing, or a CPU runtime asked to run on CUDA.
    """
    if runtime not in RUNTIME_CHOICES:
        raise InvalidInputError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIME_CHOICES)}")
    installed = available_runtimes()
    if runtime == "auto":
        if device.type != "cpu":
            return "torch"
        return next(name for name in ("openvino", "onnxruntime", "torch") if name in installed)
    if runtime not in installed:
        raise InvalidInputError(f"runtime {runtime!r} is not installed: pip install {runtime}, or use --runtime torch")
    if runtime != "torch" and device.type != "cpu":
        raise InvalidInputError(
            f"runtime {runtime!r} runs on the CPU here, but the device is {device}; use --device cpu or --runtime torch"
        )
    return runtime


def check_precision(runtime: str, precision: str) -> None:
    """Raise InvalidInputError unless ``runtime`` can run at ``precision``."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    supported = RUNTIME_CLASSES[runtime].precisions
    if precision not in supported:
        able = [name for name, cls in RUNTIME_CLASSES.items() if precision in cls.precisions]
        raise InvalidInputError(f"runtime {runtime} cannot run {precision}; use --runtime {' or '.join(able)}")


def weights_digest(network: torch.nn.Module) -> str:
    """sha256 of a network's parameters and buffers (names, shapes, dtypes and bytes), in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cache_root() -> Path:
    """Folder of converted models: ``$CBMIR_CACHE_DIR`` or ``~/.cache/cbmir``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cbmir")


@contextlib.contextmanager
def _publishing(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` that becomes ``target`` atomically (a concurrent writer's copy wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            for child in tmp.iterdir():
                child.unlink()
            tmp.rmdir()


def export_onnx(network: DescribingNetwork, image_size: int) -> bytes:
    """The network as an ONNX model with a dynamic batch: input ``grey`` (B, S, S), output ``descriptors`` (B, D)."""
    example = torch.zeros(1, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network.eval().cpu(),
            (example,),
            buffer,
            input_names=["grey"],
            output_names=["descriptors"],
            dynamic_axes={"grey": {0: "batch"}, "descriptors": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


def quantize_int8(network: DescribingNetwork, image_size: int, calibration: np.ndarray) -> bytes:
    """Post-training static int8 quantisation (QDQ, per-channel weights, uint8 activations) of the network.

    Args:
        network: the fp32 network.
        image_size: input side S.
        calibration: (N, S, S) float32 grey archive images in [0, 1] that set the activation ranges.

    Returns:
        The quantised ONNX model's bytes.
    """
    import onnxruntime  # noqa: F401  (a clear ImportError before the export)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if not len(calibration):
        raise InvalidInputError("int8 quantisation needs calibration images; the archive sample is empty")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(np.array_split(calibration, max(1, len(calibration) // 16)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {"grey": np.ascontiguousarray(batch, dtype=np.float32)}

    with tempfile.TemporaryDirectory(prefix="cbmir-int8-") as tmp:
        fp32_path, int8_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        fp32_path.write_bytes(export_onnx(network, image_size))
        logging.disable(logging.WARNING)  # the quantiser advises pre-processing on the root logger, per call
        try:
            quantize_static(
                str(fp32_path),
                str(int8_path),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        finally:
            logging.disable(logging.NOTSET)
        return int8_path.read_bytes()


class InferenceRuntime(abc.ABC):
    """A compiled :class:`DescribingNetwork`: call it with grey images (B, S, S) float32, get (B, D_raw) float32.

    Safe to call from several threads at once.
    """

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]

    @abc.abstractmethod
    def __call__(self, grey: np.ndarray) -> np.ndarray: ...


class TorchRuntime(InferenceRuntime):
    """Eager PyTorch on the network's device; bf16 through autocast (CPU or CUDA)."""

    name = "torch"
    precisions = ("fp32", "bf16")

    def __init__(self, network: DescribingNetwork, device: torch.device, precision: str) -> None:
        self.network = network
        self.device = device
        self.precision = precision

    @torch.inference_mode()
    def __call__(self, grey: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32)).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.network(x).float().cpu().numpy()


class OpenVINORuntime(InferenceRuntime):
    """OpenVINO on the CPU: converted from torch (fp32/bf16) or read from the int8 ONNX model; latency hint."""

    name = "openvino"
    precisions = ("fp32", "bf16", "int8")

    def __init__(self, model_path: Path, precision: str, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        if precision != "int8":
            config["INFERENCE_PRECISION_HINT"] = {"fp32": "f32", "bf16": "bf16"}[precision]
        self._compiled = core.compile_model(core.read_model(str(model_path)), "CPU", config)
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def __call__(self, grey: np.ndarray) -> np.ndarray:
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            result = request.infer({0: np.ascontiguousarray(grey, dtype=np.float32)})
            return np.array(next(iter(result.values())), dtype=np.float32)
        finally:
            self._requests.put(request)


class OnnxRuntimeRuntime(InferenceRuntime):
    """ONNX Runtime's CPU execution provider over the exported (fp32) or quantised (int8) ONNX model."""

    name = "onnxruntime"
    precisions = ("fp32",)

    def __init__(self, model_path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def __call__(self, grey: np.ndarray) -> np.ndarray:
        out = self._session.run(None, {"grey": np.ascontiguousarray(grey, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)


RUNTIME_CLASSES: Mapping[str, type[InferenceRuntime]] = MappingProxyType(
    {cls.name: cls for cls in (TorchRuntime, OpenVINORuntime, OnnxRuntimeRuntime)}
)


def _cached_model(kind: str, key: str, write: Any) -> Path:
    """Path of a cached model file ``model.<kind>`` under ``cache_root()/key``, written by ``write(folder)`` once."""
    folder = cache_root() / "models" / key
    path = folder / f"model.{kind}"
    if not path.is_file():
        with _publishing(folder) as tmp:
            write(tmp)
    return path


def compile_network(
    network: DescribingNetwork,
    *,
    runtime: str,
    precision: str,
    image_size: int,
    device: torch.device,
    int8_model: bytes | None = None,
) -> InferenceRuntime:
    """Compile ``network`` for a resolved runtime and precision, reusing the on-disk cache.

    Args:
        network: the extractor's network (weights as they are now).
        runtime: ``torch``, ``openvino`` or ``onnxruntime`` (already resolved).
        precision: one of :data:`PRECISIONS` the runtime supports.
        image_size: input side S the model is compiled for.
        device: where torch runs (the other runtimes run on the CPU).
        int8_model: the quantised ONNX model (required for int8).
    """
    check_precision(runtime, precision)
    threads = max(1, torch.get_num_threads())
    if runtime == "torch":
        return TorchRuntime(network, device, precision)
    if precision == "int8":
        if int8_model is None:
            raise InvalidInputError("int8 needs a quantised model: build the bundle with --precision int8")
        key = f"int8-{hashlib.sha256(int8_model).hexdigest()[:32]}"
        path = _cached_model("onnx", key, lambda tmp: (tmp / "model.onnx").write_bytes(int8_model))
    else:
        digest = hashlib.sha256(f"{network.signature}|{weights_digest(network)}".encode()).hexdigest()[:32]
        if runtime == "openvino":
            import openvino as ov

            def write_ir(tmp: Path) -> None:
                example = torch.zeros(1, image_size, image_size)
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    model = ov.convert_model(
                        network.eval().cpu(), example_input=example, input=[(-1, image_size, image_size)]
                    )
                ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)

            path = _cached_model(
                "xml", f"openvino-{re.sub(r'[^A-Za-z0-9.]+', '_', ov.__version__)}-{image_size}-{digest}", write_ir
            )
        else:
            path = _cached_model(
                "onnx",
                f"onnx-{image_size}-{digest}",
                lambda tmp: (tmp / "model.onnx").write_bytes(export_onnx(network, image_size)),
            )
    log.debug("compiled %s %s from %s", runtime, precision, path)
    if runtime == "openvino":
        return OpenVINORuntime(path, precision, threads)
    return OnnxRuntimeRuntime(path, threads)


def runtime_versions() -> dict[str, str]:
    """Installed versions of the runtimes (for benchmark records and manifests)."""
    versions = {"torch": torch.__version__}
    for name in ("openvino", "onnxruntime"):
        if importlib.util.find_spec(name) is not None:
            versions[name] = importlib.import_module(name).__version__
    return versions
