"""Audio tokenizers, chosen by `METAVOICE_TOKENIZER`.

`synthetic` is the seed's stand-in made honest (deterministic, cheap, a load simulator);
`encodec`, `dac` and `mimi` are real neural codecs (see `codec.py`).
"""

from __future__ import annotations

from typing import Callable

from ..audio import BUILTIN_TOKENIZER_LAYOUT, AudioLayout
from ..config import Settings
from .base import AudioTokenizer

_FACTORIES: dict[str, Callable[[Settings], AudioTokenizer]] = {}
# The layout each tokenizer built here reads, by (tokenizer, weights): a checkpoint's rate is only
# known once its config is loaded, and decode must make that view without holding native samples.
_LOADED_LAYOUTS: dict[tuple[str, str | None], AudioLayout] = {}


def register(name: str) -> Callable[[Callable[[Settings], AudioTokenizer]], Callable[[Settings], AudioTokenizer]]:
    def deco(factory: Callable[[Settings], AudioTokenizer]) -> Callable[[Settings], AudioTokenizer]:
        _FACTORIES[name] = factory
        return factory

    return deco


def available() -> list[str]:
    _load_builtin()
    return sorted(_FACTORIES)


def load_tokenizer(settings: Settings) -> AudioTokenizer:
    """Build the configured tokenizer; fails at start-up, never mid-stream."""
    _load_builtin()
    family = settings.tokenizer.split(":", 1)[0]
    try:
        factory = _FACTORIES[family]
    except KeyError:
        raise ValueError(
            f"unknown tokenizer {settings.tokenizer!r}; choose one of {', '.join(sorted(_FACTORIES))}"
        ) from None
    tokenizer = factory(settings)
    _LOADED_LAYOUTS[(settings.tokenizer, settings.tokenizer_weights)] = tokenizer.layout
    return tokenizer


def audio_layout(settings: Settings) -> AudioLayout:
    """The view of each clip the configured tokenizer reads, for decode to make in its one pass.

    What the tokenizer said when `load_tokenizer` built it in this process (a checkpoint of any rate
    or channel count); before that, what every built-in tokenizer's default checkpoint reads.
    """
    return _LOADED_LAYOUTS.get((settings.tokenizer, settings.tokenizer_weights), BUILTIN_TOKENIZER_LAYOUT)


def _load_builtin() -> None:
    from . import synthetic  # noqa: F401  (registers itself)

    try:
        from . import codec  # noqa: F401
    except ImportError:  # codec support is optional (transformers)
        pass


__all__ = ["AudioTokenizer", "audio_layout", "available", "load_tokenizer", "register"]
