"""A checkpoint's own chat template (a Jinja string from its tokenizer_config.json), rendered as
transformers renders it, without importing transformers.

The environment copies what transformers' `apply_chat_template` gives a template: jinja2's
`ImmutableSandboxedEnvironment` with trim_blocks, lstrip_blocks and the loopcontrols extension; the
`tojson` filter as transformers defines it (json.dumps, ensure_ascii=False, no HTML escaping);
`raise_exception`, `strftime_now`, `dict` and a `namespace` that refuses underscore names; and the
variables `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's special tokens
(`bos_token`, `eos_token`, ...) and any extras the caller passes (`thinking` for DeepSeek-V3.1).

Messages are normalised as transformers 5 does (a message's reasoning is also offered as
`thinking`), with one deliberate difference: transformers drops every key whose value is None, and
DeepSeek's released templates then fail on tool-call history (they test `content is none` and
concatenate it otherwise); here `content: None` is kept, as vLLM keeps it, and only other None
fields are dropped.

The module also knows what a template implies for tool calls (`tool_format`): DeepSeek-V3 and R1
write each call as `type<｜tool▁sep｜>name` and a fenced ```json block ("fenced"); DeepSeek-V3.1 and
nanoseek's own template write `name<｜tool▁sep｜>` and the raw JSON arguments ("raw").
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
FENCE_OPEN = "```json"


class TemplateError(ValueError):
    """The template could not render these messages (its raise_exception, or a Jinja error)."""


def tool_format(template: str) -> str | None:
    """How calls are written in a template: "fenced" (DeepSeek-V3/R1), "raw" (DeepSeek-V3.1), or
    None if it renders no tool calls. Detected from the template text: the call opener must be
    there; a ```json fence next to it means the V3 form."""
    if TOOL_CALLS_BEGIN not in template and "tool▁call▁begin" not in template:
        return None
    return "fenced" if FENCE_OPEN in template else "raw"


def reads_tools(template: str) -> bool:
    """Whether a template uses the `tools` variable (DeepSeek's released templates do not: the
    server then declares the tools in the system prompt itself)."""
    return re.search(r"\btools\b", template) is not None


def reads_thinking(template: str) -> bool:
    """Whether a template has a thinking switch (`thinking` or `enable_thinking`)."""
    return "thinking" in template


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        """jinja2's namespace without underscore-prefixed attributes (as transformers')."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template cannot set {name!r} on a namespace"
                )

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = Dict()
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"the chat template does not compile: {e}") from None


def check(template: str) -> None:
    """Raise TemplateError if the template does not compile."""
    _compile(template)


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def normalise(messages: Sequence[Mapping]) -> list[dict]:
    """Messages as a template sees them: plain dicts, None fields dropped (but `content`), the
    reasoning under both `reasoning_content` and `thinking` (as transformers 5 passes it)."""
    out = []
    for m in messages:
        m = {k: v for k, v in _plain(m).items() if v is not None or k == "content"}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _plain(value):
    """JSON-shaped data only (the sandbox sees no other objects)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def render(
    template: str,
    messages: Sequence[Mapping],
    *,
    tools: Sequence[Mapping] | None = None,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
    **extra,
) -> str:
    """The template's text for these messages (TemplateError if the template refuses them)."""
    import jinja2

    compiled = _compile(template)
    variables = {**(special_tokens or {}), **_plain(extra)}
    try:
        return compiled.render(
            messages=normalise(messages),
            tools=_plain(list(tools)) if tools is not None else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.exceptions.TemplateError as e:
        raise TemplateError(f"the chat template refused the messages: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise TemplateError(f"the chat template failed on the messages: {e}") from None
