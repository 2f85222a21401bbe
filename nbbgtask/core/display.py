"""How a `TaskStatus` that ends a notebook cell displays: the name of a renderer, which the package
sets to the notebook layer's bar (``"module:function"``).  The API layer reads it when IPython asks
for a display, and imports the renderer only then; it never imports the notebook layer itself."""

from __future__ import annotations

__all__ = ["RENDERER"]

#: ``"module:function"`` called with ``(status, include, exclude)``; "" for a plain-text display
RENDERER = ""
