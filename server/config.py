"""The server's settings: one dataclass, the single source of every default, limit and help text.

``cbmir serve`` generates its options from these fields (see :mod:`cbmir.options`), so the command line, the
defaults and the documentation cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cbmir.defaults import DEFAULT_MAX_PIXELS, PRECISIONS, RUNTIME_CHOICES
from cbmir.options import option

DEFAULT_K = 10
"""Hits returned when a request leaves ``k`` at 0."""


@dataclass(frozen=True)
class ServerConfig:
    """Server settings; every limit is enforced with a clear status code.

    ``torch_threads`` and ``search_threads`` are the intra-op threads one request uses; the default of one lets
    concurrent requests share the cores without oversubscription, and on this 2-core machine a single query was
    also fastest that way (FAISS flat, 128-d x 58,954: 1.1 ms on one thread, 2.4 ms on two).
    """

    index: str = field(metadata=option("bundle directory to serve (its live version)", required=True))
    host: str = field(default="127.0.0.1", metadata=option("address to bind"))
    port: int = field(default=50051, metadata=option("port to bind (0: any free port)"))
    max_k: int = field(default=100, metadata=option("most hits per query"))
    max_k_prep: int = field(default=1000, metadata=option("most candidates re-ranked per query"))
    max_group_size: int = field(default=100, metadata=option("most hits per group with group_by"))
    max_offset: int = field(default=10_000, metadata=option("deepest page start (offset) of a ranking"))
    max_ingest_items: int = field(default=1000, metadata=option("most images in one AddImages stream"))
    max_study_images: int = field(default=32, metadata=option("most images in one study query"))
    max_batch: int = field(default=64, metadata=option("most queries in one SearchBatch"))
    max_thumbnails: int = field(default=64, metadata=option("most ids in one GetThumbnails call"))
    max_thumbnail_side: int = field(default=512, metadata=option("largest thumbnail side in pixels"))
    workers: int = field(default=8, metadata=option("request threads"))
    max_concurrent: int = field(
        default=0, metadata=option("searches in flight before RESOURCE_EXHAUSTED (0: one per worker)")
    )
    max_message_mb: int = field(default=64, metadata=option("largest request or response, in MiB"))
    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS,
        metadata=option("largest decoded query image (width x height), checked before decoding"),
    )
    device: str = field(default="auto", metadata=option("where extractors run", device=True))
    runtime: str = field(
        default="bundle",
        metadata=option(
            "cnn inference runtime: the bundle's (as indexed), auto, torch, openvino or onnxruntime",
            choices=("bundle", *RUNTIME_CHOICES),
        ),
    )
    precision: str | None = field(
        default=None,
        metadata=option("cnn precision: fp32, bf16 or int8 (default: the bundle's)", choices=PRECISIONS),
    )
    search_device: str = field(
        default="cpu",
        metadata=option(
            "where FAISS searches: cpu, cuda (flat and IVF indices copied to the GPU; needs cbmir[gpu]) or auto",
            choices=("auto", "cpu", "cuda"),
        ),
    )
    milvus: str | None = field(
        default=None,
        metadata=option(
            "search on Milvus instead of in-process FAISS: a milvus-lite file (FILE.db) or http://HOST:19530; "
            "publish the bundle there first (cbmir publish)",
            metavar="URI",
        ),
    )
    milvus_collection: str = field(
        default="cbmir", metadata=option("collection prefix given to cbmir publish", metavar="PREFIX")
    )
    default_method: str = field(default="cnn", metadata=option("method of requests that name none (if indexed)"))
    grace_s: float = field(default=10.0, metadata=option("seconds in-flight streams get on SIGTERM", flag="--grace"))
    torch_threads: int = field(default=1, metadata=option("intra-op threads per request for the extractors"))
    search_threads: int = field(default=1, metadata=option("FAISS threads per search"))
    micro_batch: int = field(
        default=32, metadata=option("most query images described together across concurrent requests (0: off)")
    )
    watch_s: float = field(
        default=0.0,
        metadata=option(
            "check for a new bundle version this often and swap it in (also SIGHUP, Reload RPC; 0: off)",
            flag="--watch",
            metavar="SECONDS",
        ),
    )
    tls_cert: str | None = field(default=None, metadata=option("PEM server certificate (turns on TLS, with --tls-key)"))
    tls_key: str | None = field(default=None, metadata=option("PEM private key of --tls-cert"))
    tls_client_ca: str | None = field(
        default=None, metadata=option("PEM CA: require client certificates it signed (mutual TLS)")
    )
    mmap_threshold_kb: int = field(
        default=1024,
        metadata=option(
            "glibc: allocations above this many KiB (decoded images) are mmapped and returned to the OS when freed, "
            "instead of fragmenting the heap (0: glibc's own adaptive threshold)"
        ),
    )
    metrics_port: int | None = field(
        default=None, metadata=option("serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port)")
    )
    metrics_host: str | None = field(default=None, metadata=option("address of the metrics port (default: --host)"))
    tokens_file: str | None = field(
        default=None,
        metadata=option("file of 'ROLE TOKEN' lines (roles: search, admin); health checks stay open", flag="--tokens"),
    )

    @property
    def concurrency(self) -> int:
        """Searches admitted at once: ``max_concurrent``, or one per worker thread."""
        return self.max_concurrent or self.workers
