"""Bag of visual words over RootSIFT descriptors with TF-IDF weighting; cosine distance.

As in the reference paper: SIFT keypoints (capped per image), RootSIFT (L1-normalise, square root), a k-means
visual vocabulary (``faiss.Kmeans``), word counts per image weighted ``t_id = (n_id / n_d) * log(N / n_i)``
and L2-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import cv2
import faiss
import numpy as np

from cbmir.errors import InvalidInputError
from cbmir.timing import stage

from .base import Extractor
from .imaging import resize_batch
from .intensity import check_intensity, normalise_intensity
from .registry import register_extractor

log = logging.getLogger("cbmir.extractors.bovw")
PAPER_WORDS = 4000
"""The reference paper's vocabulary size."""
MIN_POINTS_PER_WORD = 39
"""FAISS k-means warns below this many training points per centroid."""


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT: L1-normalise each SIFT descriptor, then take the element-wise square root. (K, 128) -> (K, 128)."""
    d = descriptors.astype(np.float32)
    d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-7)
    return np.sqrt(d)


@register_extractor("bovw")
class BoVWExtractor(Extractor):
    """SIFT/RootSIFT bag of visual words with TF-IDF.

    Args:
        words: vocabulary size; 0 (default) picks the paper's 4000, or fewer when the fit sample yields fewer than
            39 SIFT descriptors per word (FAISS's minimum for a stable k-means), as on small images.
        image_size: images are resized to this square side before keypoint detection.
        max_keypoints: strongest keypoints kept per image.
        kmeans_iters: k-means iterations (paper: 50).
        kmeans_restarts: k-means restarts, best kept (paper: 5).
        max_points_per_centroid: subsample of descriptors used for k-means, per word.
        seed: k-means seed.
        threads: parallel SIFT workers (default: CPU count).
        device: accepted for interface symmetry; SIFT runs on the CPU.
        intensity: normalisation after resizing (:mod:`cbmir.extractors.intensity`).
    """

    metric = "cosine"
    needs_fit = True

    def __init__(
        self,
        words: int = 0,
        image_size: int = 256,
        max_keypoints: int = 350,
        kmeans_iters: int = 50,
        kmeans_restarts: int = 1,
        max_points_per_centroid: int = 64,
        seed: int = 1234,
        threads: int | None = None,
        device: str = "cpu",
        intensity: str = "none",
    ) -> None:
        if words != 0 and words < 2:
            raise InvalidInputError(f"words must be at least 2 (or 0 to choose from the archive), got {words}")
        super().__init__("cpu")  # OpenCV SIFT and FAISS k-means run on the CPU whatever the device asked for
        self.words, self.image_size, self.max_keypoints = int(words), int(image_size), int(max_keypoints)
        self.kmeans_iters, self.kmeans_restarts = int(kmeans_iters), int(kmeans_restarts)
        self.max_points_per_centroid, self.seed = int(max_points_per_centroid), int(seed)
        self.threads = threads or os.cpu_count() or 1
        self.intensity = check_intensity(intensity)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._vocabulary: np.ndarray | None = None
        self._quantizer: faiss.IndexFlatL2 | None = None
        self._idf: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return self.words

    def config(self) -> dict[str, Any]:
        return {
            "words": self.words,
            "image_size": self.image_size,
            "max_keypoints": self.max_keypoints,
            "kmeans_iters": self.kmeans_iters,
            "kmeans_restarts": self.kmeans_restarts,
            "max_points_per_centroid": self.max_points_per_centroid,
            "seed": self.seed,
            "intensity": self.intensity,
        }

    def _sift(self, image: np.ndarray) -> np.ndarray:
        sift = getattr(self._local, "sift", None)
        if sift is None:
            sift = self._local.sift = cast(Any, cv2).SIFT_create(nfeatures=self.max_keypoints)
        _, desc = sift.detectAndCompute(image, None)
        if desc is None:
            return np.zeros((0, 128), dtype=np.float32)
        return root_sift(desc)

    def local_descriptors(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """RootSIFT descriptors, one (K_i, 128) array per image."""
        with stage("preprocess"):
            resized = normalise_intensity(resize_batch(images, self.image_size), self.intensity)
            as_uint8 = [np.ascontiguousarray((img * 255.0 + 0.5).astype(np.uint8)) for img in resized]
        with stage("extract"):
            if self._pool is None or len(as_uint8) == 1:
                return [self._sift(img) for img in as_uint8]
            return list(self._pool.map(self._sift, as_uint8))

    def fit(self, images: Sequence[np.ndarray]) -> None:
        sample = np.concatenate(self.local_descriptors(images) or [np.zeros((0, 128), np.float32)])
        if self.words == 0:
            self.words = min(PAPER_WORDS, len(sample) // MIN_POINTS_PER_WORD)
            log.info(
                "bovw: %d visual words from %d SIFT descriptors of %d images (at most %d, at least %d "
                "descriptors per word)",
                self.words,
                len(sample),
                len(images),
                PAPER_WORDS,
                MIN_POINTS_PER_WORD,
            )
        elif len(sample) < self.words * MIN_POINTS_PER_WORD:
            log.warning(
                "bovw: %d words from %d SIFT descriptors is fewer than %d per word; the vocabulary may be "
                "unstable (--bovw-words 0 chooses %d)",
                self.words,
                len(sample),
                MIN_POINTS_PER_WORD,
                len(sample) // MIN_POINTS_PER_WORD,
            )
        if len(sample) < max(self.words, 2):
            raise InvalidInputError(
                f"a vocabulary of {self.words} words needs at least as many SIFT descriptors; the fit sample of "
                f"{len(images)} images gave {len(sample)}. Use more or larger images, or fewer words (--bovw-words)"
            )
        kmeans = faiss.Kmeans(
            128,
            self.words,
            niter=self.kmeans_iters,
            nredo=self.kmeans_restarts,
            seed=self.seed,
            max_points_per_centroid=self.max_points_per_centroid,
            min_points_per_centroid=1,  # too few points is reported above, once, in cbmir's words
            verbose=False,
        )
        kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
        if kmeans.centroids is None:
            raise RuntimeError("FAISS k-means produced no centroids")
        self._set_vocabulary(kmeans.centroids)

    def _set_vocabulary(self, centroids: np.ndarray) -> None:
        self._vocabulary = np.ascontiguousarray(centroids, dtype=np.float32)
        self._quantizer = faiss.IndexFlatL2(128)
        self._quantizer.add(self._vocabulary)

    def extract(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Visual-word counts, (N, words) float32."""
        if self._quantizer is None:
            raise RuntimeError("BoVW vocabulary is not fitted; call fit() or load a bundle")
        local = self.local_descriptors(images)
        sizes = np.array([len(d) for d in local])
        counts = np.zeros((len(images), self.words), dtype=np.float32)
        if sizes.sum() == 0:
            return counts
        with stage("extract"):
            _, words = self._quantizer.search(np.concatenate(local), 1)
        owner = np.repeat(np.arange(len(images)), sizes)
        np.add.at(counts, (owner, words[:, 0]), 1.0)
        return counts

    def fit_archive(self, raw: np.ndarray) -> None:
        documents_with_word = (raw > 0).sum(axis=0).astype(np.float64)
        n = max(len(raw), 1)
        self._idf = np.where(documents_with_word > 0, np.log(n / np.maximum(documents_with_word, 1)), 0.0).astype(
            np.float32
        )

    def transform(self, raw: np.ndarray) -> np.ndarray:
        if self._idf is None:
            raise RuntimeError("BoVW IDF weights are not fitted; build the archive first")
        words_per_image = np.maximum(raw.sum(axis=1, keepdims=True), 1.0)
        tfidf = (raw / words_per_image) * self._idf
        tfidf /= np.maximum(np.linalg.norm(tfidf, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(tfidf, dtype=np.float32)

    def state(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        if self._vocabulary is not None:
            state["vocabulary"] = self._vocabulary
        if self._idf is not None:
            state["idf"] = self._idf
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if "vocabulary" in state:
            self._set_vocabulary(np.asarray(state["vocabulary"]))
        if "idf" in state:
            self._idf = np.asarray(state["idf"], dtype=np.float32)

    def warmup(self) -> None:
        if self._quantizer is not None and self._idf is not None:
            super().warmup()
