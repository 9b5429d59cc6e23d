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
