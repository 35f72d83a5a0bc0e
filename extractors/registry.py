"""Registry and factory for descriptor extractors, in the style of timm's ``register_model``/``create_model``.

Adding an extractor is one decorated class::

    @register_extractor("my_descriptor")
    class MyDescriptor(Extractor):
        metric = "l2"
        ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from cbmir.errors import InvalidInputError

from .base import Extractor

_REGISTRY: dict[str, type[Extractor]] = {}
"""Filled once, at import, by the built-in extractors' decorators (and a plug-in's); re-registration is refused."""
E = TypeVar("E", bound=type[Extractor])


def register_extractor(name: str) -> Callable[[E], E]:
    """Class decorator that makes an :class:`Extractor` available to :func:`create_extractor` under ``name``."""

    def wrap(cls: E) -> E:
        if name in _REGISTRY:
            raise ValueError(f"extractor {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_extractors() -> list[str]:
    """Names accepted by :func:`create_extractor`."""
    return sorted(_REGISTRY)


def extractor_class(name: str) -> type[Extractor]:
    """The class registered under ``name``."""
    if name not in _REGISTRY:
        raise InvalidInputError(f"unknown extractor {name!r}; choose from {', '.join(list_extractors())}")
    return _REGISTRY[name]


def create_extractor(name: str, **config: Any) -> Extractor:
    """Instantiate a registered extractor by name with its keyword configuration and load its pretrained state.

    Raises:
        InvalidInputError: unknown name or configuration keys, unreadable or mismatched weights.
    """
    cls = extractor_class(name)
    try:
        extractor = cls(**config)
    except TypeError as exc:
        raise InvalidInputError(f"bad configuration for extractor {name!r}: {exc}") from exc
    extractor.load_pretrained()
    return extractor
