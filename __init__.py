"""ComfyLB as a ComfyUI custom node.

Inside ComfyUI (this folder in `custom_nodes/`), it attaches the balancer to
PromptServer.instance when a config names peers; imported anywhere else it does nothing.
"""
import logging
import os
import sys

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

log = logging.getLogger("comfylb")


def _attach() -> None:
    # ComfyUI imports its `server` module before it loads custom nodes; anywhere else
    # there is no PromptServer instance and nothing is touched.
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    from .comfylb_ext.hosts.comfyui import attach_from_environment

    try:
        attach_from_environment(instance, os.path.dirname(os.path.abspath(__file__)))
    except Exception:  # never take ComfyUI down with us
        log.exception("ComfyLB: could not attach; ComfyUI runs as usual")


_attach()
