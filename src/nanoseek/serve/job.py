"""One request's work and what the client sees of it: a Job of engine requests (one per prompt, each
with n completions) and its Choices, built up from the engine's events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nanoseek.engine import SamplingParams, StepEvent
from nanoseek.serve.chat_format import ReasoningParser
from nanoseek.serve.tools import CallDelta, ToolParser


@dataclass
class Choice:
    """One completion as the client sees it, built up from engine events."""

    index: int
    parser: ReasoningParser | None  # chat: splits reasoning from content
    prefix_text: str = ""  # completions with echo: the prompt
    token_ids: list[int] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    tools: ToolParser | None = None  # chat: splits tool calls from the content
    tool_deltas: list[CallDelta] = field(default_factory=list)  # what the latest event added

    def add(self, ev: StepEvent) -> tuple[str, str]:
        """-> (reasoning, content) this event adds (and its pieces of calls in tool_deltas)."""
        self.token_ids += ev.token_ids
        self.logprobs += ev.logprobs or []
        text = ev.text or ""
        reasoning, content = self.parser.feed(text) if self.parser else ("", text)
        if ev.finished and self.parser:
            tail_reasoning, tail_content = self.parser.finish()
            reasoning += tail_reasoning
            content += tail_content
        self.tool_deltas = []
        if self.tools is not None:
            content, self.tool_deltas = self.tools.feed(content)
            if ev.finished:
                tail_content, tail_deltas = self.tools.finish()
                content += tail_content
                self.tool_deltas += tail_deltas
        if ev.finished:
            self.finish_reason = ev.finish_reason
            if self.tools is not None and self.tools.calls and ev.finish_reason == "stop":
                self.finish_reason = "tool_calls"
        self.reasoning.append(reasoning)
        self.content.append(content)
        return reasoning, content


@dataclass
class EngineRequest:
    """One prompt of a job as the engine runs it: its engine request id and the choices it fills."""

    request_id: str
    prompt: list[int]
    choices: list[Choice]  # its n completions, by the engine's completion index
    images: object = None  # the prompt's images (an ImageInput), for a vision-language model
    cached: int = 0  # prompt tokens the prefix cache served
    # with SamplingParams.prompt_logprobs: the engine's per-prompt-token logprobs (first None)
    prompt_logprobs: list | None = None

    @property
    def done(self) -> bool:
        return all(c.finish_reason for c in self.choices)


@dataclass
class Job:
    """A request's work: one engine request per prompt, each with n completions."""

    id: str
    prompts: list[list[int]]
    params: SamplingParams
    make_parser: Callable[[], ReasoningParser | None]
    start: float  # when the request arrived (time.perf_counter)
    deadline: float  # when it must be done
    echo: list[str] | None = None
    make_tools: Callable[[], ToolParser | None] | None = None  # chat: a tool-call parser
    images: list | None = None  # per prompt: its images (an ImageInput) or None
    first_token: float | None = None
    choices: list[Choice] = field(init=False)  # every prompt's n completions, in response order
    requests: dict[str, EngineRequest] = field(
        init=False
    )  # engine request id -> its prompt and choices

    def __post_init__(self):
        n = self.params.n
        self.choices = [
            Choice(
                p * n + i,
                self.make_parser(),
                self.echo[p] if self.echo else "",
                tools=self.make_tools() if self.make_tools else None,
            )
            for p in range(len(self.prompts))
            for i in range(n)
        ]
        self.requests = {}
        for p, ids in enumerate(self.prompts):
            request_id = f"{self.id}-{p}"
            self.requests[request_id] = EngineRequest(
                request_id,
                ids,
                self.choices[p * n : (p + 1) * n],
                images=self.images[p] if self.images else None,
            )

    def choice(self, ev: StepEvent) -> Choice:
        """The choice an engine event belongs to (and note the prompt's cached tokens and
        logprobs)."""
        request = self.requests[ev.request_id]
        request.cached = ev.output.cached_tokens
        request.prompt_logprobs = ev.output.prompt_logprobs
        return request.choices[ev.index]

    @property
    def sequences(self) -> int:
        """The completions it runs: prompts x n."""
        return len(self.prompts) * self.params.n

    @property
    def tokens(self) -> int:
        """The most tokens its sequences can hold: (prompt +
        max_tokens) x n, all prompts together."""
        generated = len(self.prompts) * self.params.max_tokens
        return (sum(map(len, self.prompts)) + generated) * self.params.n

    @property
    def cached(self) -> int:
        return sum(r.cached for r in self.requests.values())

    @property
    def done(self) -> bool:
        return all(c.finish_reason for c in self.choices)
