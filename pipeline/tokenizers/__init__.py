"""Audio tokenizers, chosen by `METAVOICE_TOKENIZER`.

`synthetic` is the seed's stand-in made honest (deterministic, cheap, a load simulator);
`encodec`, `dac` and `mimi` are real neural codecs (see `codec.py`).
"""

from __future__ import annotations

from typing import Callable

from ..config import Settings
from .base import AudioTokenizer

_FACTORIES: dict[str, Callable[[Settings], AudioTokenizer]] = {}


def register(name: str) -> Callable[[Callable[[Settings], AudioTokenizer]], Callable[[Settings], AudioTokenizer]]:
    def deco(factory: Callable[[Settings], AudioTokenizer]) -> Callable[[Settings], AudioTokenizer]:
        _FACTORIES[name] = factory
        return factory

    return deco


def available() -> list[str]:
    _load_builtin()
    return sorted(_FACTORIES)


def load_tokenizer(settings: Settings) -> AudioTokenizer:
    """Build the configured tokenizer; fails at start-up, never mid-stream. What it reads (a
    checkpoint's rate is only known once its config is loaded) is its `layout`: decode makes that
    view (`Models.layouts`)."""
    _load_builtin()
    family = settings.tokenizer.split(":", 1)[0]
    try:
        factory = _FACTORIES[family]
    except KeyError:
        raise ValueError(
            f"unknown tokenizer {settings.tokenizer!r}; choose one of {', '.join(sorted(_FACTORIES))}"
        ) from None
    return factory(settings)


def _load_builtin() -> None:
    from . import synthetic  # noqa: F401  (registers itself)

    try:
        from . import codec  # noqa: F401
    except ImportError:  # codec support is optional (transformers)
        pass


__all__ = ["AudioTokenizer", "available", "load_tokenizer", "register"]
