from comfylb_ext.capability import Capabilities, cache_keys, requirements, unrunnable
from comfylb_ext.sim import catalog

A = Capabilities(catalog([], ["a.safetensors"]))
B = Capabilities(catalog([], ["b.safetensors"]))


def ckpt_prompt(name):
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}


def test_requirements_name_node_types_and_model_files():
    req = requirements(ckpt_prompt("a.safetensors"))
    assert req.classes == {"CheckpointLoaderSimple", "SaveImage"}
    assert req.models == {("CheckpointLoaderSimple", "ckpt_name", "a.safetensors")}
    assert req.model_key == {"a.safetensors"}


def test_only_peers_with_the_model_can_run_it():
    req = requirements(ckpt_prompt("a.safetensors"))
    assert A.can_run(req) and not B.can_run(req)
    assert B.lacks(req) == ["ckpt_name 'a.safetensors'"]
    assert unrunnable(req, {"a": A, "b": B}) is None


def test_a_model_nobody_has_is_refused_naming_the_node():
    error, node_errors = unrunnable(requirements(ckpt_prompt("c.safetensors")), {"a": A, "b": B})
    assert error["message"] == "No peer can run this prompt" and "a lacks ckpt_name 'c.safetensors'" in error["details"]
    assert node_errors["1"]["errors"][0]["type"] == "value_not_in_list"
    assert "c.safetensors" in node_errors["1"]["errors"][0]["details"]


def test_unknown_node_types_and_the_new_combo_spelling():
    req = requirements({"1": {"class_type": "Exotic", "inputs": {}}})
    assert not A.can_run(req) and A.lacks(req) == ["node Exotic"]
    caps = Capabilities({"L": {"input": {"required": {"lora_name": ["COMBO", {"options": ["x.pt"]}]}}}})
    assert caps.can_run(requirements({"1": {"class_type": "L", "inputs": {"lora_name": "x.pt"}}}))
    assert not caps.can_run(requirements({"1": {"class_type": "L", "inputs": {"lora_name": "y.pt"}}}))


def test_routing_rules_extract_and_refuse():
    from comfylb_ext.routing import extract, per_peer_outputs, unroutable

    prompt = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}},
              "9": {"class_type": "ComfyLBRoute", "inputs": {"target": "gpu24, b"}},
              "8": {"class_type": "ComfyLBRoute", "inputs": {"target": "gpu24"}}}
    stripped, allowed, rules = extract(prompt)
    assert set(stripped) == {"1"} and allowed == {"gpu24"}
    assert unroutable(rules, {"a": ["gpu24"], "b": []}) is None
    error, node_errors = unroutable({"9": frozenset({"gpu48"})}, {"a": ["gpu24"]})
    assert error["message"] == "No peer can run this prompt" and "gpu48" in node_errors["9"]["errors"][0]["details"]
    assert per_peer_outputs(stripped, "a")["1"]["inputs"]["filename_prefix"] == "a/x"
    assert per_peer_outputs(per_peer_outputs(stripped, "a"), "a")["1"]["inputs"]["filename_prefix"] == "a/x"


def test_cache_keys_change_with_a_node_and_everything_downstream_of_it():
    def txt2img(seed: int, text: str = "a cat") -> dict:
        return {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
                "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
                "3": {"class_type": "KSampler", "inputs": {"seed": seed, "model": ["4", 0], "positive": ["6", 0]}},
                "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}}}
    assert cache_keys(txt2img(1)) == cache_keys(txt2img(1))
    assert len(cache_keys(txt2img(1)) & cache_keys(txt2img(2))) == 2  # loader and text encoder
    assert len(cache_keys(txt2img(1)) & cache_keys(txt2img(1, "a dog"))) == 1  # the loader
    cycle = {"1": {"class_type": "A", "inputs": {"x": ["2", 0]}}, "2": {"class_type": "B", "inputs": {"y": ["1", 0]}}}
    assert len(cache_keys(cycle)) == 2  # invalid, but no hang and no crash
    assert len(cache_keys({str(i): {"class_type": "N", "inputs": {"prev": [str(i - 1), 0]}} for i in range(5000)})) == 5000
