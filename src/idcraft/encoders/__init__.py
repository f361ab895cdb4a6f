"""Image encoders: reference images -> features an adapter's projection reads."""

from .clip import ClipImageEncoder

__all__ = ["ClipImageEncoder"]
