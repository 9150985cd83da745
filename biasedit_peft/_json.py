"""Where :func:`json_ready` used to live; it is in :mod:`biasedit_peft._io` now, beside the one JSON writer.

Kept only for ``layer_sweep.py``'s import (``json_ready(document, digits=4)``, unchanged in meaning); remove this
module when that import names ``._io``.
"""

from ._io import json_ready

__all__ = ["json_ready"]
