"""Plain Python values as one line of JSON, for the calls that code grading
makes across the sandbox's channel.

Only builtin value types cross: None, bool, int, float, str, bytes, list, tuple, dict, set,
frozenset, each kept apart (a tuple stays a tuple, True stays True). `decode` builds fresh builtin
objects and nothing else, so a value it returns has the builtins' own `__eq__`: whatever the
candidate's process writes on the channel, the side that decodes it holds plain data. An object of
any other type (a subclass included) cannot be encoded.

Standard library only, with no imports of its own beyond json: its source text also runs inside the
sandbox and in the HumanEval judge, which are not given the nanoseek package.
"""

import json

MAX_DEPTH = 64


def encode(value) -> str:
    return json.dumps(to_tree(value, 0), allow_nan=True)


def decode(line: str | bytes):
    return from_tree(json.loads(line), 0)


def to_tree(value, depth: int):
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [to_tree(v, depth + 1) for v in value]
    if kind is tuple:
        return {"tuple": [to_tree(v, depth + 1) for v in value]}
    if kind in (set, frozenset):
        return {kind.__name__: [to_tree(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[to_tree(k, depth + 1), to_tree(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    raise TypeError(f"a value of type {kind.__name__} cannot cross the channel")


def from_tree(tree, depth: int):
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    kind = type(tree)
    if tree is None or kind in (bool, int, float, str):
        return tree
    if kind is list:
        return [from_tree(v, depth + 1) for v in tree]
    if kind is not dict or len(tree) != 1:
        raise ValueError("not an encoded value")
    tag = next(iter(tree))
    body = tree[tag]
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError("not an encoded value")
    if tag == "tuple":
        return tuple(from_tree(v, depth + 1) for v in body)
    if tag == "set":
        return {from_tree(v, depth + 1) for v in body}
    if tag == "frozenset":
        return frozenset(from_tree(v, depth + 1) for v in body)
    if tag == "dict":
        if not all(type(pair) is list and len(pair) == 2 for pair in body):
            raise ValueError("not an encoded dict")
        return {from_tree(k, depth + 1): from_tree(v, depth + 1) for k, v in body}
    raise ValueError(f"unknown tag {tag!r}")
