"""The metrics document and its files: strict JSON, the schema's key order."""

import json


def test_strict_json_replaces_non_finite_numbers_with_null():
    from erasure.evaluation import strict_json

    document = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "nan", "e": 3}
    assert strict_json(document) == {"a": None, "b": [1.0, None, {"c": None}], "d": "nan", "e": 3}
    json.dumps(strict_json(document), allow_nan=False)  # valid JSON
