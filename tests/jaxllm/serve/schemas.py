"""Fifty varied JSON schemas for the structured-output tests: every JSON type, enums, consts,
patterns, nested objects and arrays, optional properties, combinators and $defs.

Each value a schema allows is bounded (string lengths, integer ranges, numbers as multiples,
array sizes), so a weak model's constrained output always ends within the token budget; an
unbounded string or number may, on such a model, run to max_tokens (finish_reason "length"),
as in any engine.
"""

from __future__ import annotations

from typing import Any


def _field(k: int) -> dict[str, Any]:
    kinds = [
        {"type": "string", "maxLength": 3 + k % 5},
        {"type": "integer", "minimum": -k, "maximum": 10 * k + 5},
        {"type": "boolean"},
        {"enum": ["a", "b", f"c{k}"]},
        {"type": "array", "items": {"type": "boolean"}, "maxItems": 1 + k % 3},
        {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["x"]},
        {"type": ["string", "null"], "maxLength": 2},
        {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.125},
        {"type": "string", "pattern": "^[A-Z][a-z]{1,4}$"},
        {"const": k},
    ]
    return kinds[k % len(kinds)]


def fifty_schemas() -> list[dict[str, Any]]:
    schemas: list[dict[str, Any]] = [
        {"type": "string", "maxLength": 10},
        {"type": "integer", "minimum": 0, "maximum": 999},
        {"type": "number", "minimum": -5, "maximum": 5, "multipleOf": 0.5},
        {"type": "boolean"},
        {"type": "null"},
        {"enum": ["red", "green", "blue"]},
        {"const": "fixed"},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
         "minItems": 1, "maxItems": 4},
        {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
        {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                   {"type": "string", "maxLength": 4}]},
    ]
    for i in range(40):
        names = [f"k{i}_{j}" for j in range(1 + i % 4)]
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {n: _field(i + 3 * j) for j, n in enumerate(names)},
            "required": [n for j, n in enumerate(names) if (i + j) % 2 == 0]}
        if i % 7 == 0:  # definitions and references
            schema = {"$defs": {"item": schema}, "type": "array",
                      "items": {"$ref": "#/$defs/item"}, "maxItems": 2}
        elif i % 5 == 0:  # one of two shapes
            schema = {"oneOf": [schema, {"type": "object", "properties": {
                "alt": {"type": "boolean"}}, "required": ["alt"]}]}
        schemas.append(schema)
    return schemas
