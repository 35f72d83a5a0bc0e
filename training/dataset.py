"""Decoded, labelled images for training and cross-validation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from cbmir.errors import InvalidInputError
from cbmir.index_build.archive import Archive, ImageRecord

log = logging.getLogger("cbmir.train")


@dataclass
class LabelledImages:
    """Images of an archive held in memory with their ids and metadata columns."""

    ids: list[str]
    images: list[np.ndarray]
    metadata: dict[str, list[str]]
    skipped: list[str]
    uris: list[str] = field(default_factory=list)
    """Archive URIs of the images (empty when the images did not come from an archive)."""

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        """The images at ``indices``, in that order."""
        return LabelledImages(
            ids=[self.ids[i] for i in indices],
            images=[self.images[i] for i in indices],
            metadata={k: [v[i] for i in indices] for k, v in self.metadata.items()},
            skipped=self.skipped,
            uris=[self.uris[i] for i in indices] if self.uris else [],
        )

    def column(self, field: str) -> list[str]:
        if field not in self.metadata:
            raise InvalidInputError(f"metadata field {field!r} not found; the archive has {sorted(self.metadata)}")
        return self.metadata[field]


def decode_archive(archive: Archive, *, progress: bool = True, threads: int = 4) -> LabelledImages:
    """Decode every archive image (threads; decoders release the GIL); unreadable ones are skipped and listed."""

    def load(i: int) -> ImageRecord | str:
        try:
            return archive.load(i)
        except InvalidInputError as exc:
            return f"{archive.entries[i].id}: {exc}"

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(
            tqdm(
                pool.map(load, range(len(archive))),
                total=len(archive),
                desc="decode",
                disable=not progress,
                leave=False,
            )
        )
    records = [r for r in results if isinstance(r, ImageRecord)]
    skipped = [r for r in results if isinstance(r, str)]
    for reason in skipped[:5]:
        log.warning("skipped %s", reason)
    fields = sorted({k for r in records for k in r.metadata})
    return LabelledImages(
        ids=[r.id for r in records],
        images=[r.image for r in records],
        metadata={f: [r.metadata.get(f, "") for r in records] for f in fields},
        skipped=skipped,
        uris=[r.uri for r in records],
    )


def balanced_subsample(labels: list[str], n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``n`` samples, as evenly spread over the classes as their sizes allow."""
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    arr = np.asarray(labels)
    by_class = {c: rng.permutation(np.flatnonzero(arr == c)) for c in np.unique(arr)}
    quota = {c: 0 for c in by_class}
    remaining = n
    while remaining > 0:
        open_classes = [c for c in by_class if quota[c] < len(by_class[c])]
        share = max(1, remaining // len(open_classes))
        for c in open_classes:
            add = min(share, len(by_class[c]) - quota[c], remaining)
            quota[c] += add
            remaining -= add
            if remaining == 0:
                break
    return np.sort(np.concatenate([idx[: quota[c]] for c, idx in by_class.items()]))
