import copy

from comfylb_ext.replacements import MAX_CLASSES, MAX_MAPPING, MAX_PER_CLASS, apply, merge, parse

# shape of ComfyUI's GET /node_replacements (NodeReplace.as_dict per old class)
RAW = {
    "OldScale": [{
        "new_node_id": "NewScale", "old_node_id": "OldScale", "old_widget_ids": ["factor"],
        "input_mapping": [{"new_id": "image", "old_id": "pixels"},
                          {"new_id": "scale_by", "old_id": "factor"},
                          {"new_id": "method", "set_value": "lanczos"}],
        "output_mapping": [{"old_idx": 0, "new_idx": 1}],
    }],
}
KNOWN = {"LoadImage", "NewScale", "SaveImage", "PreviewImage"}


def prompt():
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "OldScale", "inputs": {"pixels": ["1", 0], "factor": 2.0, "dropped": 7},
              "_meta": {"title": "Scale"}, "is_changed": "x"},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "o"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 3]}},
    }


def test_swaps_class_rebuilds_inputs_and_keeps_other_keys():
    out = apply(prompt(), parse(RAW), KNOWN)
    assert out["2"] == {"class_type": "NewScale",
                        "inputs": {"image": ["1", 0], "scale_by": 2.0, "method": "lanczos"},
                        "_meta": {"title": "Scale"}, "is_changed": "x"}
    assert list(out) == ["1", "2", "3", "4"]


def test_downstream_link_remapped_by_output_mapping_only_for_mapped_index():
    out = apply(prompt(), parse(RAW), KNOWN)
    assert out["3"]["inputs"] == {"images": ["2", 1], "filename_prefix": "o"}
    assert out["4"]["inputs"] == {"images": ["2", 3]}      # no mapping for index 3: unchanged


def test_input_prompt_untouched_and_unchanged_nodes_shared():
    p = prompt()
    before = copy.deepcopy(p)
    reps = parse(RAW)
    reps_before = copy.deepcopy(reps)
    out = apply(p, reps, KNOWN)
    assert p == before and reps == reps_before
    assert out is not p and out["1"] is p["1"] and out["4"] is p["4"]
    out["3"]["inputs"]["images"][1] = 99
    out["2"]["inputs"]["image"][1] = 99
    out["2"]["_meta"]["title"] = "changed"
    assert p == before


def test_set_value_not_shared_between_nodes_or_with_the_map():
    raw = {"Old": [{"new_node_id": "New", "input_mapping": [{"new_id": "opts", "set_value": {"a": [1]}}]}]}
    reps = parse(raw)
    out = apply({"1": {"class_type": "Old", "inputs": {}}, "2": {"class_type": "Old", "inputs": {}}}, reps, {"New"})
    out["1"]["inputs"]["opts"]["a"].append(2)
    assert out["2"]["inputs"]["opts"] == {"a": [1]}
    assert reps["Old"][0]["input_mapping"][0]["set_value"] == {"a": [1]}


def test_no_replacement_when_class_known_or_new_class_unknown():
    p = prompt()
    assert apply(p, parse(RAW), KNOWN | {"OldScale"}) == p
    assert apply(p, parse(RAW), KNOWN - {"NewScale"}) == p
    assert apply(p, {}, KNOWN) == p


def test_first_replacement_with_a_known_class_is_used():
    raw = {"Old": [{"new_node_id": "Gone"}, {"new_node_id": "B"}, {"new_node_id": "C"}]}
    p = {"1": {"class_type": "Old", "inputs": {}}}
    assert apply(p, parse(raw), {"B", "C"})["1"]["class_type"] == "B"
    assert apply(p, parse(raw), {"C"})["1"]["class_type"] == "C"


def test_replaced_consumer_of_replaced_source_gets_remapped_link():
    raw = {"OldA": [{"new_node_id": "A", "output_mapping": [{"old_idx": 0, "new_idx": 2}]}],
           "OldB": [{"new_node_id": "B", "input_mapping": [{"new_id": "x", "old_id": "in"}]}]}
    p = {"1": {"class_type": "OldA", "inputs": {}},
         "2": {"class_type": "OldB", "inputs": {"in": ["1", 0]}}}
    out = apply(p, parse(raw), {"A", "B"})
    assert out["2"] == {"class_type": "B", "inputs": {"x": ["1", 2]}}
    assert p["2"]["inputs"]["in"] == ["1", 0]


def test_mapping_naming_a_missing_old_input_leaves_that_input_out():
    p = {"2": {"class_type": "OldScale", "inputs": {"factor": 3}}}
    out = apply(p, parse(RAW), KNOWN)
    assert out["2"]["inputs"] == {"scale_by": 3, "method": "lanczos"}


def test_hostile_prompts_never_raise():
    reps = parse(RAW)
    hostile = [
        None, [], "x", 3,
        {"1": None, "2": "str", "3": [1, 2], "4": {"class_type": "OldScale"}},
        {"1": {"class_type": "OldScale", "inputs": None}},
        {"1": {"class_type": "OldScale", "inputs": ["pixels"]}},
        {"1": {"class_type": ["OldScale"], "inputs": {}}},
        {"1": {"class_type": {"a": 1}, "inputs": {}}},
        {"1": {"class_type": "OldScale", "inputs": {"pixels": ["9"], "factor": [1, 2, 3]}, "_meta": "t"},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1"], "x": [1, 0], "y": ["1", "0"],
                                                      "z": ["1", None], "w": ["1", float("nan")]}}},
        {"last_node_id": 5, "1": {"class_type": "OldScale", "inputs": {}}},
    ]
    for p in hostile:
        before = repr(p)                     # repr: NaN != NaN
        out = apply(p, reps, KNOWN)
        assert repr(p) == before
        if isinstance(p, dict):
            assert isinstance(out, dict) and set(out) == set(p)
    # malformed nodes are left alone, well-formed ones still replaced
    out = apply(hostile[4], reps, KNOWN)
    assert out["4"] is hostile[4]["4"]
    out = apply(hostile[10], reps, KNOWN)
    assert out["last_node_id"] == 5 and out["1"]["class_type"] == "NewScale"
    out = apply(hostile[9], reps, KNOWN)
    assert out["1"]["class_type"] == "NewScale" and out["2"]["inputs"]["images"] == ["1"]


def test_apply_with_hand_built_bad_map_never_raises():
    p = {"1": {"class_type": "Old", "inputs": {"a": 1}}, "2": {"class_type": "S", "inputs": {"i": ["1", 0]}}}
    bad_maps = [None, [], {"Old": None}, {"Old": "New"}, {"Old": [None, 1, "x"]},
                {"Old": [{"new_node_id": "New", "input_mapping": "a"}]},
                {"Old": [{"new_node_id": "New", "input_mapping": [{"old_id": "a"}]}]},
                {"Old": [{"new_node_id": "New", "output_mapping": [{"old_idx": "0", "new_idx": 1}]}]},
                {"Old": [{"new_node_id": ["New"]}]}]
    for m in bad_maps:
        assert apply(p, m, {"New", "S"}) == p


def test_parse_keeps_good_entries_in_comfyui_shape():
    assert parse(RAW) == {"OldScale": [{
        "new_node_id": "NewScale", "old_node_id": "OldScale", "old_widget_ids": ["factor"],
        "input_mapping": [{"new_id": "image", "old_id": "pixels"}, {"new_id": "scale_by", "old_id": "factor"},
                          {"new_id": "method", "set_value": "lanczos"}],
        "output_mapping": [{"old_idx": 0, "new_idx": 1}]}]}
    # as_dict() answers None for empty mappings; old_node_id may be absent
    assert parse({"A": [{"new_node_id": "B", "input_mapping": [], "output_mapping": None}]}) == {
        "A": [{"new_node_id": "B", "old_node_id": "A", "old_widget_ids": None,
               "input_mapping": None, "output_mapping": None}]}


def test_parse_drops_bad_entries_and_never_raises():
    for raw in (None, [], "x", 1, {1: [{"new_node_id": "B"}]}, {"": [{"new_node_id": "B"}]},
                {"A": None}, {"A": {"new_node_id": "B"}}, {"A": []}):
        assert parse(raw) == {}
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    bad = [
        None, "B", {"new_node_id": 5}, {"new_node_id": ""}, {"old_node_id": "A"},
        {"new_node_id": "A", "old_node_id": "A"},     # replaces itself (under "X": names another class)
        {"new_node_id": "B", "old_node_id": "Other"},
        {"new_node_id": "B", "input_mapping": {"new_id": "x"}},
        {"new_node_id": "B", "input_mapping": [{"new_id": "x"}]},
        {"new_node_id": "B", "input_mapping": [{"old_id": "x"}]},
        {"new_node_id": "B", "input_mapping": [{"new_id": 1, "old_id": "x"}]},
        {"new_node_id": "B", "input_mapping": [{"new_id": "x", "old_id": 3}]},
        {"new_node_id": "B", "input_mapping": [{"new_id": "x", "set_value": object()}]},
        {"new_node_id": "B", "input_mapping": [{"new_id": "x", "set_value": deep}]},
        {"new_node_id": "B", "output_mapping": [{"old_idx": 0}]},
        {"new_node_id": "B", "output_mapping": [{"old_idx": 0, "new_idx": -1}]},
        {"new_node_id": "B", "output_mapping": [{"old_idx": True, "new_idx": 1}]},
        {"new_node_id": "B", "output_mapping": [[0, 1]]},
        {"new_node_id": "B", "input_mapping": [{"new_id": f"i{n}", "set_value": n} for n in range(MAX_MAPPING + 1)]},
    ]
    good = {"new_node_id": "C", "old_widget_ids": [1, 2]}
    out = parse({"A": bad + [good, dict(good)], "X": bad})
    assert out == {"A": [{"new_node_id": "C", "old_node_id": "A", "old_widget_ids": None,
                          "input_mapping": None, "output_mapping": None}]}


def test_parse_bounds_sizes():
    many = {f"C{i}": [{"new_node_id": "N"}] for i in range(MAX_CLASSES + 50)}
    out = parse(many)
    assert len(out) == MAX_CLASSES and "C0" in out and f"C{MAX_CLASSES}" not in out
    out = parse({"A": [{"new_node_id": f"N{i}"} for i in range(MAX_PER_CLASS + 5)]})
    assert [e["new_node_id"] for e in out["A"]] == [f"N{i}" for i in range(MAX_PER_CLASS)]
    ok = [{"new_id": f"i{n}", "set_value": n} for n in range(MAX_MAPPING)]
    assert len(parse({"A": [{"new_node_id": "B", "input_mapping": ok}]})["A"][0]["input_mapping"]) == MAX_MAPPING


def test_merge_order_and_duplicates():
    p1 = parse({"A": [{"new_node_id": "B1"}, {"new_node_id": "B2"}], "X": [{"new_node_id": "Y"}]})
    p2 = parse({"A": [{"new_node_id": "B3"}, {"new_node_id": "B1", "input_mapping": [
        {"new_id": "z", "set_value": 1}]}], "Q": [{"new_node_id": "R"}]})
    merged = merge([p1, {}, p2])
    assert list(merged) == ["A", "X", "Q"]
    assert [e["new_node_id"] for e in merged["A"]] == ["B1", "B2", "B3"]
    assert merged["A"][0]["input_mapping"] is None            # first peer's B1 wins
    assert [e["new_node_id"] for e in merge([p2, p1])["A"]] == ["B3", "B1", "B2"]
    assert merge([]) == {} and merge([None, "x", {"A": None}]) == {}
    assert p1["A"] == parse({"A": [{"new_node_id": "B1"}, {"new_node_id": "B2"}]})["A"]   # inputs untouched


def test_merge_caps_per_class():
    maps = [parse({"A": [{"new_node_id": f"N{p}_{i}"} for i in range(10)]}) for p in range(3)]
    merged = merge(maps)
    assert len(merged["A"]) == MAX_PER_CLASS and merged["A"][0]["new_node_id"] == "N0_0"
