"""JsonObject: typed reads of untrusted JSON that name the field and the rule."""
from __future__ import annotations

import pytest

from hypersdk.service.definitions import JsonObject
from hypersdk.service.errors import InvalidArgument


@pytest.mark.parametrize("field, value, read, rule", [
    ("name", 5, lambda f: f.text("name"), "a string"),
    ("mode", "quick", lambda f: f.text("mode", choices=("fast", "safe")), "one of fast, safe"),
    ("count", True, lambda f: f.integer("count", minimum=1), "an integer"),
    ("count", 0, lambda f: f.integer("count", minimum=1), "an integer >= 1"),
    ("count", 10, lambda f: f.integer("count", minimum=1, maximum=9), "an integer from 1 to 9"),
    ("on", "yes", lambda f: f.flag("on"), "true or false"),
    ("options", [], lambda f: f.mapping("options"), "must be a JSON object"),
    ("name", " ", lambda f: f.text("name", non_empty=True), "a non-empty string"),
    ("count", "5", lambda f: f.number("count", above=0, unit="seconds"),
     "a number of seconds > 0"),
    ("count", 0, lambda f: f.number("count", above=0), "a number > 0"),
    ("mode", [], lambda f: f.texts("mode", choices=("fast", "safe"), non_empty=True),
     "a non-empty list of: fast, safe"),
    ("mode", "fast", lambda f: f.texts("mode"), "a list of strings"),
])
def test_json_object_names_the_field_and_the_rule(field, value, read, rule):
    names = ("name", "mode", "count", "on", "options")
    with pytest.raises(InvalidArgument) as info:
        read(JsonObject({field: value}, names, "policy."))
    assert (info.value.field, info.value.rule) == (f"policy.{field}", rule)


def test_json_object_defaults_required_and_unknown_fields():
    fields = JsonObject({"name": "web01", "count": None}, ("name", "count", "on"))
    assert fields.text("name") == "web01" and fields.integer("count", 3) == 3
    assert fields.flag("on", False) is False
    with pytest.raises(InvalidArgument, match="on: required"):
        fields.flag("on")
    with pytest.raises(InvalidArgument, match=r"colour: unknown field \(known: name\)"):
        JsonObject({"colour": "red"}, ("name",))


def test_list_items_map_values_and_sections_are_named_with_their_path():
    fields = JsonObject({"events": ["a", "c"], "headers": {"X": 1}, "options": {"speed": 1},
                         "count": 2.5}, ("events", "headers", "options", "count"), "hook.")
    with pytest.raises(InvalidArgument) as info:
        fields.texts("events", choices=("a", "b"))
    assert (info.value.field, info.value.rule) == ("hook.events[1]", "one of a, b")
    with pytest.raises(InvalidArgument) as info:
        fields.text_map("headers")
    assert (info.value.field, info.value.rule) == ("hook.headers.X", "a string")
    with pytest.raises(InvalidArgument) as info:
        fields.section("options", ("format",))
    assert info.value.field == "hook.options.speed"
    assert fields.number("count") == 2.5 and fields.section("missing", ()).data == {}
    with pytest.raises(InvalidArgument, match=r"^x: unknown field \(known: none\)$"):
        JsonObject({"x": 1}, ())
