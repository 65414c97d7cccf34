"""Schema fuzzing of the HTTP API: request bodies drawn from the server's own /openapi.json (valid
ones, ones with wrong values in the right fields, and any JSON at all), and the rule every answer
must keep: no 5xx, and every error an OpenAI error object. Shared by tests/test_serve_hardening.py
and benchmarks/serve_fuzz.py."""

from __future__ import annotations

import json

import httpx
from hypothesis import strategies as st

ROUTES = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")
JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False)
)
ANY_JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def request_schema(doc: dict, route: str) -> dict:
    """The JSON schema of a route's request body, its $refs into the components inlined."""
    content = doc["paths"][route]["post"]["requestBody"]["content"]
    return _inline(content["application/json"]["schema"], doc["components"]["schemas"])


def _inline(node, components: dict):
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(components[node["$ref"].rsplit("/", 1)[1]], components)
        return {k: _inline(v, components) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, components) for v in node]
    return node


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values that a JSON schema of the kind pydantic writes accepts (inlined: no $ref)."""
    if "anyOf" in schema:
        return st.one_of(*map(from_schema, schema["anyOf"]))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        extra = schema.get("additionalProperties", True)
        if not properties:
            values = ANY_JSON if extra is True else from_schema(extra)
            return st.dictionaries(st.text(max_size=10), values, max_size=3)
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in properties.items() if k in required},
            optional={k: from_schema(v) for k, v in properties.items() if k not in required},
        )
    if kind == "array":
        least = schema.get("minItems", 0)
        return st.lists(
            from_schema(schema.get("items", {})),
            min_size=least,
            max_size=schema.get("maxItems", least + 4),
        )
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        if kind == "integer":
            low = None if low is None else low + ("exclusiveMinimum" in schema)
            high = None if high is None else high - ("exclusiveMaximum" in schema)
            return st.integers(low, high)
        return st.floats(
            low,
            high,
            allow_nan=False,
            allow_infinity=False,
            exclude_min="exclusiveMinimum" in schema,
            exclude_max="exclusiveMaximum" in schema,
        )
    if kind == "string":
        least = schema.get("minLength", 0)
        return st.text(min_size=least, max_size=schema.get("maxLength", least + 20))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return ANY_JSON  # {}: any JSON value


def bodies(schema: dict) -> st.SearchStrategy:
    """A route's request bodies: valid ones, its fields with any JSON values, and any JSON."""
    shapes = schema.get("anyOf", [schema])  # a route may take one of several bodies (/tokenize)
    fields = sorted({name for shape in shapes for name in shape.get("properties", {})})
    valid = from_schema(schema)
    wrong_values = st.dictionaries(st.sampled_from(fields), ANY_JSON, max_size=6)
    mixed = st.tuples(valid, wrong_values).map(lambda pair: {**pair[0], **pair[1]})
    return st.one_of(valid, mixed, wrong_values, ANY_JSON)


def requests(doc: dict) -> st.SearchStrategy:
    """(route, body) pairs over every POST route of the API."""
    return st.one_of(
        *(st.tuples(st.just(route), bodies(request_schema(doc, route))) for route in ROUTES)
    )


def send(client: httpx.Client, url: str, route: str, body, headers: dict) -> tuple[int, list[str]]:
    """POST a body; -> (status, what is wrong with the answer: nothing is [])."""
    status, text, media = _post(client, url + route, body, headers)
    return status, [f"{route} {status}: {p}" for p in problems(status, text, media)]


def _post(client: httpx.Client, url: str, body, headers: dict) -> tuple[int, str, str]:
    raw = json.dumps(body).encode()
    headers = {**headers, "Content-Type": "application/json"}
    with client.stream("POST", url, content=raw, headers=headers) as r:
        text = r.read().decode("utf-8", "replace")
        return r.status_code, text, r.headers.get("content-type", "")


def problems(status: int, text: str, media: str) -> list[str]:
    """What is wrong with an answer: a 5xx, an error that is no OpenAI error object."""
    if status >= 500:
        return [text[:300]]
    if status >= 400:
        return error_problems(text)
    if not media.startswith("text/event-stream"):
        json.loads(text)
        return []
    found = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]" and "error" in json.loads(line[6:]):
            found += [f"in the stream: {p}" for p in error_problems(line[6:])]
    return found


def error_problems(text: str) -> list[str]:
    """What keeps a body from being an OpenAI error object."""
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return [f"not an error object: {text[:300]}"]
    shape = {
        "message": (str,),
        "type": (str,),
        "param": (str, type(None)),
        "code": (str, type(None)),
    }
    if not isinstance(error, dict) or set(error) != set(shape):
        return [f"error fields: {text[:300]}"]
    return [
        f"error.{k} is {type(error[k]).__name__}"
        for k, types in shape.items()
        if not isinstance(error[k], types)
    ]
