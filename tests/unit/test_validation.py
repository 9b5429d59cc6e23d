from comfylb_ext.sim import catalog
from comfylb_ext.validation import validate

CAT = catalog(["a.png"], ["m.safetensors"])


def test_good_prompt_lists_outputs():
    p = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    assert validate(p, CAT) == (True, None, ["2"], {})
    assert validate(p, CAT, partial=["1"])[1]["type"] == "prompt_no_outputs"


def test_unknown_node_missing_class_type_and_no_outputs():
    assert validate({"1": {"class_type": "Nope", "inputs": {}}}, CAT)[1] == {
        "type": "invalid_prompt", "message": "Cannot execute because node Nope does not exist.",
        "details": "Node ID '#1'", "extra_info": {}}
    assert validate({"1": {"inputs": {}}}, CAT)[1]["message"].startswith("Cannot execute because a node is missing")
    assert validate({"1": {"class_type": "ImageInvert", "inputs": {}}}, CAT)[1]["type"] == "prompt_no_outputs"


def test_missing_required_input_reports_each_node():
    p = {"1": {"class_type": "ImageInvert", "inputs": {}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    ok, error, outputs, node_errors = validate(p, CAT)
    assert not ok and error["type"] == "prompt_outputs_failed_validation"
    assert error["details"] == "Required input is missing: filename_prefix"
    assert node_errors["1"]["errors"][0]["details"] == "image"
    assert node_errors["1"]["dependent_outputs"] == ["2"] and node_errors["2"]["class_type"] == "SaveImage"


def test_link_to_a_missing_node_and_cycles_do_not_crash():
    p = {"2": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "x"}}}
    ok, error, _, node_errors = validate(p, CAT)
    assert not ok and node_errors["2"]["errors"][0]["type"] == "exception_during_validation"
    cyc = {"1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
           "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
           "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}
    assert validate(cyc, CAT)[0] is False


def test_without_a_catalog_only_structure_is_checked():
    assert validate({"1": {"class_type": "Anything", "inputs": {}}}, None)[0] is True
    assert validate("nope", None)[0] is False


# -- value checks (execution.py validate_inputs), on a small hand-made catalog -----------

def _node(required: dict, output: tuple = (), optional: dict | None = None, output_node: bool = False) -> dict:
    inputs = {"required": required, **({"optional": optional} if optional else {})}
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()}, "output": list(output),
            "output_is_list": [False] * len(output), "output_name": list(output), "name": "", "display_name": "",
            "description": "", "python_module": "nodes", "category": "test", "output_node": output_node}


INT = ["INT", {"default": 1, "min": 1, "max": 10}]
FLOAT = ["FLOAT", {"default": 1.0, "min": 0.5, "max": 2.0}]
MODES = [["a", "b"], {}]
KINDS = ["COMBO", {"options": ["x", "y"]}]
VCAT = {
    "Num": _node({"i": INT, "f": FLOAT, "s": ["STRING", {}], "b": ["BOOLEAN", {"default": False}]}, ("IMAGE",)),
    "Pick": _node({"mode": MODES, "kind": KINDS}, ("IMAGE",),
                  optional={"many": [[f"m{i}" for i in range(21)], {}],
                            "tags": ["COMBO", {"options": ["x", "y"], "multiselect": True}],
                            "remote": ["COMBO", {"remote_combo": {"route": "/voices"}}],
                            "folder": ["COMBO", {"remote": {"route": "/internal/files/output"}}],
                            "ckpt_name": [["a.safetensors", "b.safetensors"], {}]}),
    "Load": _node({"image": [["a.png", "b.png"], {"image_upload": True}]}, ("IMAGE", "MASK")),
    "LoadOut": _node({"image": ["COMBO", {"image_upload": True, "image_folder": "output"}]}, ("IMAGE", "MASK")),
    "LoadAudio": _node({"audio": [["a.wav"], {"audio_upload": True}]}, ("AUDIO",)),
    "LoadVideo": _node({"file": ["COMBO", {"options": ["a.mp4"], "video_upload": True}]}, ("VIDEO",)),
    "Load3D": _node({"model_file": [["3d/a.glb"], {"file_upload": True}]}, ("IMAGE",)),
    "Any": _node({"value": ["*", {}]}, ("*",)),
    "Masked": _node({"image": ["IMAGE", {}], "mask": ["MASK", {}]}, ("IMAGE",)),
    "Either": _node({"value": ["IMAGE,MASK", {}]}, ("IMAGE",)),
    "Out": _node({"images": ["IMAGE", {}]}, optional={"n": ["INT", {"max": 3}]}, output_node=True),
}
NUM_OK = {"i": 5, "f": 1.0, "s": "t", "b": True}


def one(class_type: str, inputs: dict, **kw):
    """validate() of node 1 feeding output 9; (result, node 1's errors or None)."""
    prompt = {"1": {"class_type": class_type, "inputs": inputs},
              "9": {"class_type": "Out", "inputs": {"images": ["1", 0]}}}
    result = validate(prompt, VCAT, **kw)
    return result, result[3].get("1", {}).get("errors")


def test_good_values_pass_after_comfyui_conversions():
    # int("5"), int(True), int(9.9) == 9, float(True), bool("false") is True, str(5), {"__value__": …}
    for inputs in ({"i": "5", "f": "1.5", "s": 5, "b": "false"}, {"i": True, "f": True, "s": None, "b": 0},
                   {"i": 9.9, "f": 2, "s": "", "b": {"__value__": [1]}}, {**NUM_OK, "i": {"__value__": 10}}):
        assert one("Num", inputs) == ((True, None, ["9"], {}), None)
    pick = {"mode": "b", "kind": "y", "many": "m20", "tags": {"__value__": ["x", "y"]}, "remote": "anything",
            "folder": "anything"}
    assert one("Pick", pick)[0] == (True, None, ["9"], {})


def test_wrong_literal_type_is_invalid_input_type():
    (ok, error, outputs, node_errors), errors = one("Num", {**NUM_OK, "i": "abc", "f": None})
    assert (ok, outputs, error["type"]) == (False, [], "prompt_outputs_failed_validation")
    assert node_errors["1"]["dependent_outputs"] == ["9"] and node_errors["1"]["class_type"] == "Num"
    assert errors == [
        {"type": "invalid_input_type", "message": "Failed to convert an input value to a INT value",
         "details": "i, abc, invalid literal for int() with base 10: 'abc'",
         "extra_info": {"input_name": "i", "input_config": INT, "received_value": "abc",
                        "exception_message": "invalid literal for int() with base 10: 'abc'"}},
        {"type": "invalid_input_type", "message": "Failed to convert an input value to a FLOAT value",
         "details": "f, None, float() argument must be a string or a real number, not 'NoneType'",
         "extra_info": {"input_name": "f", "input_config": FLOAT, "received_value": None,
                        "exception_message": "float() argument must be a string or a real number, not 'NoneType'"}}]
    assert one("Num", {**NUM_OK, "i": {"x": 1}})[1][0]["details"] == (
        "i, {'x': 1}, int() argument must be a string, a bytes-like object or a real number, not 'dict'")
    assert one("Num", {**NUM_OK, "i": float("inf")})[1][0]["extra_info"]["exception_message"] == (
        "cannot convert float infinity to integer")


def test_min_and_max_compare_the_converted_value():
    assert one("Num", {**NUM_OK, "i": 0})[1] == [
        {"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 1", "details": "i",
         "extra_info": {"input_name": "i", "input_config": INT, "received_value": 0}}]
    assert one("Num", {**NUM_OK, "i": "20"})[1] == [
        {"type": "value_bigger_than_max", "message": "Value 20 bigger than max of 10", "details": "i",
         "extra_info": {"input_name": "i", "input_config": INT, "received_value": 20}}]
    assert one("Num", {**NUM_OK, "f": 3})[1][0]["message"] == "Value 3.0 bigger than max of 2.0"
    # bools are ints to ComfyUI: False is 0, below min 1; 10.9 truncates to 10, within max
    assert one("Num", {**NUM_OK, "i": False})[1][0]["message"] == "Value 0 smaller than min of 1"
    assert one("Num", {**NUM_OK, "i": 10.9})[1] is None
    # ComfyUI takes NaN and infinities (NaN compares false both ways); ComfyLB refuses them,
    # as JSON cannot carry them back to anyone
    for value in (float("nan"), "nan", "inf", "-Infinity"):
        error = one("Num", {**NUM_OK, "f": value})[1][0]
        assert error["type"] == "invalid_input_type" and "not a finite number" in error["details"], value
    # an error on the output node itself is what the top-level details list
    prompt = {"1": {"class_type": "Num", "inputs": NUM_OK},
              "9": {"class_type": "Out", "inputs": {"images": ["1", 0], "n": 4}}}
    assert validate(prompt, VCAT)[1]["details"] == "Value 4 bigger than max of 3: n"


def test_combo_value_not_in_list_in_both_spellings():
    pick = {"mode": "a", "kind": "x"}
    assert one("Pick", {**pick, "mode": "c"})[1] == [
        {"type": "value_not_in_list", "message": "Value not in list", "details": "mode: 'c' not in ['a', 'b']",
         "extra_info": {"input_name": "mode", "input_config": MODES, "received_value": "c"}}]
    assert one("Pick", {**pick, "kind": "z"})[1] == [
        {"type": "value_not_in_list", "message": "Value not in list", "details": "kind: 'z' not in ['x', 'y']",
         "extra_info": {"input_name": "kind", "input_config": KINDS, "received_value": "z"}}]
    assert one("Pick", {**pick, "mode": 1})[1][0]["details"] == "mode: 1 not in ['a', 'b']"  # repr(), newest
    assert one("Pick", {**pick, "many": "m99"})[1] == [
        {"type": "value_not_in_list", "message": "Value not in list",
         "details": "many: 'm99' not in (list of length 21)",
         "extra_info": {"input_name": "many", "input_config": None, "received_value": "m99"}}]
    assert one("Pick", {**pick, "tags": {"__value__": ["x", "q", "r"]}})[1][0]["details"] == (
        "tags: 'q', 'r' not in ['x', 'y']")


def test_model_pickers_are_left_to_capability():
    # the catalog holds one peer's list; capability.unrunnable checks every peer's
    assert one("Pick", {"mode": "a", "kind": "x", "ckpt_name": "elsewhere.safetensors"})[1] is None


def test_upload_pickers_accept_listed_or_held_files_else_the_loaders_error():
    held = {"held.png", "clip.mp4", "song.wav", "3d/b.glb", "out.png [output]"}.__contains__
    assert one("Load", {"image": "nowhere.png"})[1] is None  # no known_files: left to the peer
    for name in ("a.png", "held.png", {"__value__": "held.png"}):
        assert one("Load", {"image": name}, known_files=held)[0][0] is True
    assert one("Load", {"image": "nowhere.png"}, known_files=held)[1] == [
        {"type": "custom_validation_failed", "message": "Custom validation failed for node",
         "details": "image - Invalid image file: nowhere.png", "extra_info": {"input_name": "image"}}]
    assert one("LoadOut", {"image": "out.png [output]"}, known_files=held)[1] is None
    assert one("LoadAudio", {"audio": "x.wav"}, known_files=held)[1][0]["details"] == (
        "audio - Invalid audio file: x.wav")
    assert one("LoadVideo", {"file": "x.mp4"}, known_files=held)[1][0]["details"] == "file - Invalid video file: x.mp4"
    # Load3D has no VALIDATE_INPUTS: its list is checked, a held file will be on it by then
    assert one("Load3D", {"model_file": "3d/b.glb"}, known_files=held)[1] is None
    assert one("Load3D", {"model_file": "3d/c.glb"}, known_files=held)[1][0]["details"] == (
        "model_file: '3d/c.glb' not in ['3d/a.glb']")


def test_a_non_string_file_name_raises_as_in_comfyui():
    # LoadImage.VALIDATE_INPUTS calls name.endswith: the node's parent reports the exception
    (ok, _, _, node_errors), errors = one("Load", {"image": 5}, known_files=lambda n: False)
    assert not ok and errors == [
        {"type": "exception_during_inner_validation", "message": "Exception when validating inner node",
         "details": "'int' object has no attribute 'endswith'",
         "extra_info": {"input_name": "images", "input_config": ["IMAGE", {}],
                        "exception_message": "'int' object has no attribute 'endswith'",
                        "exception_type": "AttributeError", "traceback": [], "linked_node": ["1", 0]}}]
    assert list(node_errors) == ["1"]  # the output failed only through its input


def test_a_bad_node_fails_only_the_outputs_that_depend_on_it():
    prompt = {"1": {"class_type": "Num", "inputs": {**NUM_OK, "i": 99}},
              "2": {"class_type": "Num", "inputs": NUM_OK},
              "8": {"class_type": "Out", "inputs": {"images": ["1", 0]}},
              "9": {"class_type": "Out", "inputs": {"images": ["2", 0]}}}
    ok, error, outputs, node_errors = validate(prompt, VCAT)
    assert (ok, error, outputs, list(node_errors)) == (True, None, ["9"], ["1"])
    assert node_errors["1"]["dependent_outputs"] == ["8"]


def test_link_types_when_asked():
    prompt = {"1": {"class_type": "Num", "inputs": {**NUM_OK, "i": 99}},
              "2": {"class_type": "Masked", "inputs": {"image": ["1", 0], "mask": ["1", 0]}},
              "9": {"class_type": "Out", "inputs": {"images": ["2", 0]}}}
    assert list(validate(prompt, VCAT)[3]) == ["1"]  # off by default: the linked node is checked
    ok, _, _, node_errors = validate(prompt, VCAT, link_types=True)
    assert not ok and node_errors["2"]["errors"] == [
        {"type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
         "details": "mask, received_type(IMAGE) mismatch input_type(MASK)",
         "extra_info": {"input_name": "mask", "input_config": ["MASK", {}], "received_type": "IMAGE",
                        "linked_node": ["1", 0]}}]
    assert "1" in node_errors  # reached through `image`, whose type matches
    good = {"1": {"class_type": "Load", "inputs": {"image": "a.png"}},
            "2": {"class_type": "Any", "inputs": {"value": ["1", 1]}},
            "3": {"class_type": "Either", "inputs": {"value": ["1", 1]}},
            "4": {"class_type": "Masked", "inputs": {"image": ["3", 0], "mask": ["2", 0]}},
            "9": {"class_type": "Out", "inputs": {"images": ["4", 0]}}}
    assert validate(good, VCAT, link_types=True) == (True, None, ["9"], {})
    bad_slot = {"1": {"class_type": "Load", "inputs": {"image": "a.png"}},
                "9": {"class_type": "Out", "inputs": {"images": ["1", 5]}}}
    assert validate(bad_slot, VCAT, link_types=True)[3]["9"]["errors"] == [
        {"type": "exception_during_validation", "message": "Exception when validating node",
         "details": "tuple index out of range", "extra_info": {"exception_type": "IndexError", "traceback": []}}]


def test_deep_graphs_validate_without_recursion():
    prompt = {"0": {"class_type": "Num", "inputs": NUM_OK}}
    for i in range(1, 5000):
        prompt[str(i)] = {"class_type": "Masked", "inputs": {"image": [str(i - 1), 0], "mask": ["m", 1]}}
    prompt["m"] = {"class_type": "Load", "inputs": {"image": "a.png"}}
    prompt["out"] = {"class_type": "Out", "inputs": {"images": ["4999", 0]}}
    assert validate(prompt, VCAT, known_files=lambda n: False, link_types=True) == (True, None, ["out"], {})
    prompt["0"]["inputs"] = {**NUM_OK, "i": 0}
    assert list(validate(prompt, VCAT)[3]) == ["0"]
    prompt["0"] = {"class_type": "Masked", "inputs": {"image": ["4999", 0], "mask": ["m", 1]}}  # a cycle
    assert validate(prompt, VCAT)[3]["out"]["errors"][0]["type"] == "exception_during_validation"


def test_sim_prompts_pass_every_check():
    sleep = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 5}},
             "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": 0.5}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "s"}}}
    load = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
            "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "area", "width": 64,
                                                         "height": 64, "crop": "disabled"}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "l"}}}
    for prompt in (sleep, load):
        assert validate(prompt, CAT, known_files=lambda n: False, link_types=True) == (True, None, ["3"], {})
    load["2"]["inputs"]["crop"] = "edges"
    assert validate(load, CAT)[3]["2"]["errors"][0]["details"] == "crop: 'edges' not in ['disabled', 'center']"
