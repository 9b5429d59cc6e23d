"""ComfyLB core: a load balancer for ComfyUI.  Imports without ComfyUI, torch or a GPU."""
__version__ = "0.1.0"
