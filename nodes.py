"""Nodes ComfyLB adds to ComfyUI.  They steer the balancer and are removed from the graph
before a prompt is sent to a peer, so peers need not have ComfyLB installed."""


class ComfyLBRoute:
    """Say where this workflow may run: peer names or tags (from each peer's `tags` in
    ComfyLB's config), separated by commas.  Not connected to anything; empty = anywhere."""

    DESCRIPTION = ("ComfyLB: run this workflow only on the named peers or on peers with one of these tags "
                   "(comma-separated, e.g. 'gpu24' or 'comfy-2, comfy-3'). Without ComfyLB it does nothing.")
    CATEGORY = "ComfyLB"
    RETURN_TYPES = ()
    FUNCTION = "route"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"target": ("STRING", {
            "default": "", "multiline": False,
            "tooltip": "Peer names or tags, comma-separated. Empty: any peer."})}}

    def route(self, target: str) -> tuple:
        return ()


NODE_CLASS_MAPPINGS = {"ComfyLBRoute": ComfyLBRoute}
NODE_DISPLAY_NAME_MAPPINGS = {"ComfyLBRoute": "ComfyLB: Run On…"}
