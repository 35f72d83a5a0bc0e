"""cbmir: content-based medical image retrieval.

Data flow: archive (``cbmir.index_build.archive``) -> descriptors (``cbmir.extractors``) -> index bundle
(``cbmir.index_build.bundle``) -> search engine and gRPC service (``cbmir.server``) -> client (``cbmir.client``).
"""

__version__ = "0.1.0"
