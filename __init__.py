"""ComfyUI entry point. ComfyUI imports this file from custom_nodes/; anything else importing it
(pytest collecting the repository, tools) gets no nodes and needs no ComfyUI."""
import os
import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

if "comfy" in sys.modules:
    # The engine is imported as the top-level package `nunchaku_ext` (its backends are found by
    # that name). Appended, not prepended: this folder also holds `nodes/` and `tests/`, which must
    # not shadow ComfyUI's own modules.
    _here = os.path.dirname(os.path.abspath(__file__))
    if _here not in sys.path:
        sys.path.append(_here)
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
