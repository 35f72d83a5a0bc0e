"""Search backends: where the k nearest archive rows are found.

``faiss`` (default): the bundle's FAISS indices in this process, optionally on a GPU. ``milvus``: the bundle's
vectors and metadata published to Milvus (milvus-lite file, standalone or cluster) with ``cbmir publish``.
"""

from .base import Allowed, RowSelection, SearchBackend, allowed_mask
from .faiss_backend import FaissBackend

__all__ = ["Allowed", "FaissBackend", "RowSelection", "SearchBackend", "allowed_mask"]
