"""segkit: U-Net segmentation where the output head (softmax or sigmoid) decides everything."""

from __future__ import annotations

__version__ = "0.1.0"

from segkit.errors import ConfigError, DataError, SegkitError  # noqa: E402

__all__ = ["ConfigError", "DataError", "SegkitError", "Segmenter", "__version__"]


def __getattr__(name: str):
    # Segmenter pulls in torch and smp; import it only when asked for.
    if name == "Segmenter":
        from segkit.infer import Segmenter

        return Segmenter
    raise AttributeError(name)
