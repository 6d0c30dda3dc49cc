"""lorasynth's ComfyUI node pack.

This folder is both the ``lorasynth.apps.comfyui`` package and a ComfyUI custom node: link or
copy it into ``ComfyUI/custom_nodes/`` (``lorasynth comfyui install COMFY_DIR`` does the
link) with lorasynth installed in ComfyUI's Python environment. ComfyUI loads it under the
folder's name, so the imports below are absolute. Nothing from ComfyUI is imported here.
"""

import os
import sys

if __name__ != "lorasynth.apps.comfyui":  # loaded by ComfyUI as a custom node
    try:
        import lorasynth  # noqa: F401
    except ImportError:  # a linked source checkout that is not installed: use the checkout
        sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))))

from lorasynth.apps.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
