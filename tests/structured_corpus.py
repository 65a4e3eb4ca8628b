"""A corpus of JSON schemas for structured-output tests: hand-written cases plus generated ones.

Each case is (name, schema, must_enforce). must_enforce=True marks the keywords the issue requires the
engine to enforce (objects, required/optional, additionalProperties, arrays with min/max items, enums,
const, anyOf/oneOf, $defs/$ref, numeric bounds, patterns, the common string formats): such a schema must
be accepted and its outputs must validate. must_enforce=False marks keywords an engine may refuse
(uniqueItems, not, if/then/else, contains, ...): those must either be enforced (every output validates)
or be refused with a 400 naming the keyword, never answered unconstrained.

Generated schemas are drawn from a fixed seed so the corpus is the same on every run. Strings carry a
maxLength and arrays a maxItems so a random-weight model closes its outputs within a short max_tokens.
"""

from __future__ import annotations

import random
from typing import Any

Schema = dict[str, Any]
Case = tuple[str, Schema, bool]

# Formats jsonschema's FormatChecker can check without extra packages, and the issue asks for.
CHECKED_FORMATS = ["date", "time", "email", "uuid", "ipv4", "ipv6"]


def _obj(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    schema["required"] = list(properties) if required is None else required
    schema.update(extra)
    return schema


SHORT = {"type": "string", "maxLength": 8}

HAND_WRITTEN: list[Case] = [
    ("flat_object", _obj({"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 120}}), True),
    ("optional_fields", _obj({"a": SHORT, "b": {"type": "boolean"}, "c": {"type": "null"}}, ["a"]), True),
    ("no_required", _obj({"x": {"type": "integer", "minimum": -5, "maximum": 5}}, []), True),
    ("empty_object", {"type": "object", "properties": {}, "additionalProperties": False}, True),
    ("any_object", {"type": "object"}, True),
    ("enum_strings", {"type": "string", "enum": ["red", "green", "blue"]}, True),
    ("enum_mixed", {"enum": ["a", 1, True, None, 2.5]}, True),
    ("const_string", {"const": "fixed value"}, True),
    (
        "const_object",
        _obj({"kind": {"const": "point"}, "x": {"type": "integer", "minimum": 0, "maximum": 9}}),
        True,
    ),
    ("bool", {"type": "boolean"}, True),
    ("null", {"type": "null"}, True),
    ("integer_range", {"type": "integer", "minimum": 10, "maximum": 20}, True),
    ("integer_exclusive", {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5}, True),
    ("negative_range", {"type": "integer", "minimum": -100, "maximum": -90}, True),
    ("number_range", {"type": "number", "minimum": 0, "maximum": 1}, True),
    ("number_exclusive", {"type": "number", "exclusiveMinimum": -1.5, "exclusiveMaximum": 1.5}, True),
    (
        "array_minmax",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 2,
            "maxItems": 4,
        },
        True,
    ),
    ("array_exact", {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3}, True),
    ("array_empty_allowed", {"type": "array", "items": SHORT, "maxItems": 2}, True),
    (
        "tuple_prefix",
        {
            "type": "array",
            "prefixItems": [SHORT, {"type": "integer", "minimum": 0, "maximum": 3}],
            "items": False,
        },
        True,
    ),
    ("pattern_digits", {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}, True),
    ("pattern_word", {"type": "string", "pattern": "^[a-z]+$", "maxLength": 10}, True),
    ("pattern_alternation", {"type": "string", "pattern": "^(yes|no|maybe)$"}, True),
    ("string_minmax", {"type": "string", "minLength": 3, "maxLength": 5}, True),
    ("format_date", {"type": "string", "format": "date"}, True),
    ("format_time", {"type": "string", "format": "time"}, True),
    ("format_email", {"type": "string", "format": "email", "maxLength": 24}, True),
    ("format_uuid", {"type": "string", "format": "uuid"}, True),
    ("format_ipv4", {"type": "string", "format": "ipv4"}, True),
    ("format_ipv6", {"type": "string", "format": "ipv6", "maxLength": 39}, True),
    ("format_date_time", {"type": "string", "format": "date-time"}, True),
    (
        "anyof_scalars",
        {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, SHORT, {"type": "null"}]},
        True,
    ),
    (
        "oneof_disjoint",
        {"oneOf": [_obj({"cat": SHORT}), _obj({"dog": {"type": "integer", "minimum": 0, "maximum": 9}})]},
        True,
    ),
    ("type_list", {"type": ["integer", "null"], "minimum": 0, "maximum": 9}, True),
    ("nullable_field", _obj({"note": {"anyOf": [SHORT, {"type": "null"}]}}), True),
    (
        "defs_ref",
        {
            "$defs": {"item": _obj({"id": {"type": "integer", "minimum": 0, "maximum": 99}, "label": SHORT})},
            "type": "object",
            "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 2}},
            "required": ["items"],
            "additionalProperties": False,
        },
        True,
    ),
    (
        "definitions_ref",
        {
            "definitions": {"colour": {"enum": ["red", "blue"]}},
            "type": "object",
            "properties": {"fg": {"$ref": "#/definitions/colour"}, "bg": {"$ref": "#/definitions/colour"}},
            "required": ["fg", "bg"],
            "additionalProperties": False,
        },
        True,
    ),
    (
        "recursive_tree",
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "v": {"type": "integer", "minimum": 0, "maximum": 9},
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 1},
                    },
                    "required": ["v"],
                    "additionalProperties": False,
                }
            },
            "$ref": "#/$defs/node",
        },
        True,
    ),
    (
        "additional_typed",
        {
            "type": "object",
            "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
            "maxProperties": 3,
        },
        False,
    ),
    (
        "additional_true",
        {"type": "object", "properties": {"a": SHORT}, "required": ["a"], "additionalProperties": True},
        True,
    ),
    (
        "deep_nesting",
        _obj({"a": _obj({"b": _obj({"c": _obj({"d": {"type": "integer", "minimum": 0, "maximum": 9}})})})}),
        True,
    ),
    (
        "pydantic_style",
        {
            "title": "Person",
            "description": "a person",
            "type": "object",
            "properties": {
                "name": {"title": "Name", "type": "string", "maxLength": 10, "description": "the name"},
                "tags": {
                    "title": "Tags",
                    "type": "array",
                    "items": {"type": "string", "maxLength": 5},
                    "maxItems": 2,
                    "default": [],
                },
            },
            "required": ["name"],
            "additionalProperties": False,
        },
        True,
    ),
    (
        "allof_merge",
        {
            "allOf": [
                _obj({"a": SHORT}, ["a"], additionalProperties=True),
                {"type": "object", "required": ["a"]},
            ]
        },
        False,
    ),
    # Keywords an engine may refuse: enforced, or a 400 naming the keyword.
    (
        "unique_items",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 3},
            "uniqueItems": True,
            "maxItems": 3,
        },
        False,
    ),
    ("not_keyword", {"not": {"type": "string"}}, False),
    (
        "if_then_else",
        {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string", "maxLength": 3}},
        False,
    ),
    (
        "contains",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "contains": {"const": 7},
            "maxItems": 3,
        },
        False,
    ),
    ("multiple_of", {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}, False),
    (
        "min_max_properties",
        {"type": "object", "additionalProperties": SHORT, "minProperties": 1, "maxProperties": 2},
        False,
    ),
    (
        "pattern_properties",
        {
            "type": "object",
            "patternProperties": {"^x_": {"type": "integer", "minimum": 0, "maximum": 9}},
            "additionalProperties": False,
        },
        False,
    ),
    (
        "dependent_required",
        {
            "type": "object",
            "properties": {"a": SHORT, "b": SHORT},
            "dependentRequired": {"a": ["b"]},
            "additionalProperties": False,
        },
        False,
    ),
    (
        "property_names",
        {
            "type": "object",
            "propertyNames": {"pattern": "^[a-z]{1,3}$"},
            "additionalProperties": {"type": "null"},
            "maxProperties": 2,
        },
        False,
    ),
    ("format_unknown", {"type": "string", "format": "x-made-up-format"}, False),
    ("external_ref", {"$ref": "https://example.com/schemas/thing.json"}, False),
    (
        "unevaluated_properties",
        {"type": "object", "properties": {"a": SHORT}, "unevaluatedProperties": False},
        False,
    ),
]


class _Generator:
    """Random schemas from building blocks, each bounded so that a short output can complete it."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.names = ["id", "name", "kind", "size", "tags", "owner", "level", "ok", "note", "items", "x", "y"]

    def scalar(self) -> Schema:
        r = self.rng
        choice = r.randrange(10)
        if choice == 0:
            return {"type": "string", "maxLength": r.randint(1, 8)}
        if choice == 1:
            low = r.randint(-50, 50)
            return {"type": "integer", "minimum": low, "maximum": low + r.randint(0, 100)}
        if choice == 2:
            return {"type": "number", "minimum": -10, "maximum": r.choice([1, 10, 100])}
        if choice == 3:
            return {"type": "boolean"}
        if choice == 4:
            return {"enum": r.sample(["alpha", "beta", "gamma", "delta", "eps"], r.randint(1, 4))}
        if choice == 5:
            return {"const": r.choice(["on", 0, False, None, "v1"])}
        if choice == 6:
            return {
                "type": "string",
                "pattern": r.choice(["^[a-f0-9]{4}$", "^[A-Z][a-z]{1,5}$", "^(x|y|z)+$"]),
                "maxLength": 6,
            }
        if choice == 7:
            return {"type": "string", "format": r.choice(CHECKED_FORMATS), "maxLength": 40}
        if choice == 8:
            return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}
        return {"type": "string", "minLength": 1, "maxLength": r.randint(2, 6)}

    def value(self, depth: int) -> Schema:
        roll = self.rng.random()
        if depth > 0 and roll < 0.25:
            return self.obj(depth - 1)
        if depth > 0 and roll < 0.45:
            low = self.rng.randint(0, 2)
            return {
                "type": "array",
                "items": self.value(depth - 1),
                "minItems": low,
                "maxItems": low + self.rng.randint(0, 2),
            }
        if depth > 0 and roll < 0.52:
            return {"oneOf": [self.obj(0), {"type": "null"}]}
        return self.scalar()

    def obj(self, depth: int) -> Schema:
        keys = self.rng.sample(self.names, self.rng.randint(1, 4))
        properties = {k: self.value(depth) for k in keys}
        required = [k for k in keys if self.rng.random() < 0.7]
        return _obj(properties, required)

    def with_defs(self, depth: int) -> Schema:
        """A root that refers to a shared definition from two places."""
        shared = self.obj(max(0, depth - 1))
        return {
            "$defs": {"shared": shared},
            "type": "object",
            "properties": {
                "first": {"$ref": "#/$defs/shared"},
                "rest": {"type": "array", "items": {"$ref": "#/$defs/shared"}, "maxItems": 1},
            },
            "required": ["first"],
            "additionalProperties": False,
        }


def generated(count: int = 180, seed: int = 14) -> list[Case]:
    gen = _Generator(seed)
    cases: list[Case] = []
    for i in range(count):
        depth = i % 3
        if i % 6 == 5:
            schema = gen.with_defs(depth + 1)
        elif i % 7 == 6:
            schema = {"type": "array", "items": gen.obj(depth), "minItems": 1, "maxItems": 2}
        else:
            schema = gen.obj(depth)
        cases.append((f"gen_{i:03d}", schema, True))
    return cases


def corpus() -> list[Case]:
    """Every case, hand-written first; names are unique."""
    cases = HAND_WRITTEN + generated()
    assert len({name for name, _, _ in cases}) == len(cases)
    return cases
