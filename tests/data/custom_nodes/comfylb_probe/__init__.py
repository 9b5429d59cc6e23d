"""A test node for the model-copy tests: it names a checkpoint as model loaders do (an
input ending in _name whose choices are the files in models/checkpoints) and, instead of
loading it, shows the file's sha256 — so a prompt can need a model and still run on CPU."""
import hashlib

import folder_paths


class ComfyLBModelProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def probe(self, ckpt_name):
        h = hashlib.sha256()
        with open(folder_paths.get_full_path("checkpoints", ckpt_name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return {"ui": {"text": [h.hexdigest()]}}


NODE_CLASS_MAPPINGS = {"ComfyLBModelProbe": ComfyLBModelProbe}
