"""Chat data for supervised fine-tuning: validated conversations → token ids
with a loss mask → packed batches.

A conversation is a list of messages, the shape the chat template and the server use:

    {"role": "system" | "user" | "assistant" | "tool", "content": str,
     "reasoning_content": str (assistant, optional),
     "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": JSON text}}]
                   (assistant, optional; its content may then be ""),
     "tool_call_id": str (tool: the call it answers),
     "weight": 0 | 1 (assistant, optional, as in OpenAI's fine-tuning files: 0 = context only,
                      not trained)}

The tools a conversation may call are declared the way the chat template declares them: a last
system message holding `tokenizer.tool_declaration(tools)` (`with_tools`), which renders byte for
byte what `apply_chat_template(..., tools=tools)` and so the server render. An assistant message
with tool_calls is followed by one tool message per call, then the next assistant message.

Tokens come from the tokenizer's chat template, and only what the assistant writes carries loss. For
an assistant turn with reasoning the template renders
`<｜Assistant｜><think>\\n{reasoning}\\n</think>\\n{content}<eos>`; the generation prompt at
inference is `<｜Assistant｜><think>\\n`, so the trained span is what follows it:
`{reasoning}\\n</think>\\n{content}<eos>`. A turn without reasoning is prompted without the think
tag (the template's `thinking=False`) and trains on `{content}<eos>`. The conversation is rendered
once and the spans are located by the template's control tokens, which message text may not contain;
the reasoning is stripped of surrounding whitespace so that `<think>\\n` tokenizes the same way as
the generation prompt ends.

Message content is rendered like transformers' apply_chat_template: special-token strings in it
(`<answer>`, `</answer>`) become special tokens. Task prompts are rendered the same way by
`prompt_ids` in SFT, evaluation and RL, so the three agree.

Users can bring their own data as JSONL, one `{"messages": [...]}` object per line
(`read_chat_jsonl`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.tokenizer import SPECIAL_TOKENS, tool_declaration

ROLES = ("system", "user", "assistant", "tool")
FIELDS = {"role", "content", "reasoning_content", "tool_calls", "tool_call_id", "weight"}
CONTROL_TOKENS = tuple(SPECIAL_TOKENS[name] for name in ("bos", "eos", "user", "assistant"))
Messages = list[dict]


class ChatDataError(ValueError):
    """A conversation or a chat JSONL file is malformed; the message says where and what."""


# --------------------------------------------------------------------------------------- validation
def validate_messages(messages, where: str = "conversation") -> Messages:
    """Check one conversation and return it normalised (reasoning stripped of surrounding
    whitespace, so the template's `<think>\\n` boundary tokenizes the same in training and at
    inference). Raises ChatDataError."""
    if not isinstance(messages, list) or not messages:
        raise ChatDataError(f"{where}: 'messages' must be a non-empty list of message objects")
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(m, Mapping):
            raise ChatDataError(
                f"{at}: expected an object with 'role' and 'content', got {type(m).__name__}"
            )
        role = m.get("role")
        if role not in ROLES:
            raise ChatDataError(f"{at}: role must be one of {list(ROLES)}, got {role!r}")
        unknown = set(m) - FIELDS
        if unknown:
            raise ChatDataError(
                f"{at}: unknown field(s) {sorted(unknown)}; allowed: {', '.join(sorted(FIELDS))}"
            )
        content, reasoning = m.get("content"), m.get("reasoning_content")
        if not isinstance(content, str):
            raise ChatDataError(
                f"{at} ({role}): 'content' must be a string, got {type(content).__name__}"
            )
        if reasoning is not None and role != "assistant":
            raise ChatDataError(
                f"{at} ({role}): only assistant messages may have 'reasoning_content'"
            )
        if reasoning is not None and not isinstance(reasoning, str):
            raise ChatDataError(
                f"{at}: 'reasoning_content' must be a string, got {type(reasoning).__name__}"
            )
        if role == "system" and any(p["role"] != "system" for p in out):
            raise ChatDataError(f"{at}: system messages must come before the conversation starts")
        calls = _tool_calls(m.get("tool_calls"), at) if role == "assistant" else None
        if m.get("tool_calls") is not None and role != "assistant":
            raise ChatDataError(f"{at} ({role}): only assistant messages may have 'tool_calls'")
        if role == "assistant" and not (content.strip() or (reasoning or "").strip() or calls):
            raise ChatDataError(f"{at}: the assistant message is empty")
        call_id = m.get("tool_call_id")
        if role == "tool" and not isinstance(call_id, str):
            raise ChatDataError(f"{at} (tool): 'tool_call_id' must be a string")
        if role != "tool" and call_id is not None:
            raise ChatDataError(f"{at} ({role}): only tool messages may have 'tool_call_id'")
        weight = m.get("weight", 1)
        if (
            weight not in (0, 1)
            or isinstance(weight, bool)
            or (role != "assistant" and "weight" in m)
        ):
            raise ChatDataError(f"{at} ({role}): 'weight' is 0 or 1, on assistant messages only")
        texts = [content, reasoning or ""]
        texts += [c["function"]["name"] + c["function"]["arguments"] for c in calls or []]
        for text in texts:
            bad = next((t for t in CONTROL_TOKENS if t in text), None)
            if bad:
                raise ChatDataError(
                    f"{at} ({role}): contains the chat control token {bad!r}; the template writes "
                    "those itself"
                )
        clean = {"role": role, "content": content}
        if reasoning and reasoning.strip():
            clean["reasoning_content"] = reasoning.strip()
        if calls:
            clean["tool_calls"] = calls
        if role == "tool":
            clean["tool_call_id"] = call_id
        if role == "assistant" and weight == 0:
            clean["weight"] = 0
        out.append(clean)
    _check_turns(out, where)
    return out


def _tool_calls(calls, at: str) -> list[dict] | None:
    """An assistant message's tool_calls, checked (OpenAI's shape; arguments as JSON text)."""
    if calls is None:
        return None
    if not isinstance(calls, list) or not calls:
        raise ChatDataError(f"{at}: 'tool_calls' must be a non-empty list")
    out = []
    for k, c in enumerate(calls):
        function = c.get("function") if isinstance(c, Mapping) else None
        if (
            not isinstance(function, Mapping)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
            or not isinstance(c.get("id"), str)
        ):
            raise ChatDataError(
                f'{at}: tool call {k} must look like {{"id": "...", "type": "function", '
                '"function": {"name": "...", "arguments": "<JSON text>"}}'
            )
        try:
            json.loads(function["arguments"])
        except ValueError:
            raise ChatDataError(f"{at}: tool call {k}: 'arguments' is not JSON text") from None
        out.append(
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": function["name"], "arguments": function["arguments"]},
            }
        )
    return out


def _check_turns(messages: Messages, where: str) -> None:
    """After the system messages: user, then assistant; an assistant message with tool calls is
    followed by one tool message per call (answering them), then an assistant message."""
    turns = [m for m in messages if m["role"] != "system"]
    roles = [m["role"] for m in turns]
    if "assistant" not in roles:
        raise ChatDataError(f"{where}: no assistant message, so nothing to learn from")
    expected = {"user"}
    pending: list[str] = []
    for m in turns:
        if m["role"] not in expected:
            raise ChatDataError(
                f"{where}: after the system messages, turns must alternate user, assistant, user, "
                "... (an assistant message with tool calls is followed by one tool message per "
                f"call, then an assistant message); got {roles}"
            )
        if m["role"] == "tool":
            if m["tool_call_id"] not in pending:
                raise ChatDataError(
                    f"{where}: tool_call_id {m['tool_call_id']!r} answers no open call"
                )
            pending.remove(m["tool_call_id"])
            expected = {"tool"} if pending else {"assistant"}
        elif m["role"] == "assistant" and m.get("tool_calls"):
            pending = [c["id"] for c in m["tool_calls"]]
            expected = {"tool"}
        else:
            expected = {"assistant"} if m["role"] == "user" else {"user"}


def with_tools(messages: Messages, tools: Sequence[Mapping]) -> Messages:
    """The conversation with its tools declared as the chat template declares them (after the
    system messages: see the module doc)."""
    if not all(isinstance(t, Mapping) for t in tools):
        raise ChatDataError(
            "tools must be function objects ({'type': 'function', 'function': ...})"
        )
    at = next(
        (
            i
            for i, m in enumerate(messages)
            if not (isinstance(m, Mapping) and m.get("role") == "system")
        ),
        len(messages),
    )
    declaration = {"role": "system", "content": tool_declaration(tools)}
    return [*messages[:at], declaration, *messages[at:]]


def read_chat_jsonl(path: str | os.PathLike) -> list[Messages]:
    """Conversations from a JSONL file with one {"messages": [...]} object
    per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: no such chat JSONL file")
    conversations = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise ChatDataError(f"{path}:{n}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise ChatDataError(
                    f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(record, dict) or "messages" not in record:
                raise ChatDataError(
                    f'{path}:{n}: expected an object like {{"messages": [{{"role": "user", '
                    f'"content": "..."}}, {{"role": "assistant", "content": "..."}}]}}'
                )
            messages = record["messages"]
            if record.get("tools"):  # OpenAI's fine-tuning files carry them beside the messages
                if not isinstance(messages, list) or not isinstance(record["tools"], list):
                    raise ChatDataError(f"{path}:{n}: 'messages' and 'tools' must be lists")
                messages = with_tools(messages, record["tools"])
            conversations.append(validate_messages(messages, f"{path}:{n}"))
    if not conversations:
        raise ChatDataError(f"{path}: no conversations in the file")
    return conversations


def write_chat_jsonl(path: str | os.PathLike, conversations: Sequence[Messages]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------- tokenization
def prompt_ids(tok, prompt: str, thinking: bool = True, system: str | None = None) -> list[int]:
    """A one-turn prompt, ready for generation:
    `<bos>[system]<｜User｜>{prompt}<｜Assistant｜><think>\\n`."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return tok.apply_chat_template(messages, add_generation_prompt=True, thinking=thinking)


def completion_text(tok, token_ids: Sequence[int]) -> str:
    """Generated ids → the text a grader reads: special tokens such as
    `<answer>` kept, a final eos dropped."""
    ids = list(token_ids)
    if ids and ids[-1] == tok.eos_id:
        ids.pop()
    return tok.decode(ids)


def tokenize_conversation(tok, messages: Messages) -> tuple[list[int], list[bool]]:
    """(ids, trainable): trainable[i] is True where ids[i] is written by
    the assistant (and so is a target)."""
    messages = validate_messages(messages)
    ids = tok.apply_chat_template(messages)
    return ids, _trainable(tok, messages, ids)


def tokenize_conversations(
    tok, conversations: Sequence[Messages]
) -> list[tuple[list[int], list[bool]]]:
    """tokenize_conversation for many at once: the rendered texts are encoded in one batch
    (special-token strings split the text exactly as the template's piecewise encoding does; checked
    on the first conversation)."""
    conversations = [validate_messages(c, f"conversation {i}") for i, c in enumerate(conversations)]
    texts = [tok.apply_chat_template(c, tokenize=False) for c in conversations]
    all_ids = tok.encode_batch(texts, allow_special=True)
    if conversations and all_ids[0] != tok.apply_chat_template(conversations[0]):
        raise ChatDataError("batch encoding disagrees with the chat template for this tokenizer")
    return [(ids, _trainable(tok, c, ids)) for c, ids in zip(conversations, all_ids)]


def _trainable(tok, messages: Messages, ids: list[int]) -> list[bool]:
    """Each assistant turn starts at its `<｜Assistant｜>` token (text cannot contain one, see
    validate_messages); its trained span starts after what the generation prompt supplies (`<think>`
    and the ids of "\\n" when the turn has reasoning) and ends with its eos."""
    trainable = [False] * len(ids)
    assistant, eos = tok.special_ids["assistant"], tok.eos_id
    think = [tok.special_ids["think"], *tok.encode("\n")] if "think" in tok.special_ids else None
    starts = [i for i, t in enumerate(ids) if t == assistant]
    turns = [m for m in messages if m["role"] == "assistant"]
    if len(starts) != len(turns):
        raise ChatDataError(
            f"the rendered conversation has {len(starts)} assistant headers for {len(turns)} "
            "assistant messages"
        )
    for k, (start, m) in enumerate(zip(starts, turns)):
        if m.get("weight", 1) == 0:
            continue
        begin = start + 1
        if "reasoning_content" in m:
            if think is None or ids[begin : begin + len(think)] != think:
                raise ChatDataError(
                    f"assistant message {k}: the think block does not start the way the generation "
                    "prompt does (<think> then a newline); this tokenizer cannot train it"
                )
            begin += len(think)
        end = ids.index(eos, begin) + 1
        trainable[begin:end] = [True] * (end - begin)
    return trainable


def problem_messages(problem) -> Messages:
    """A task problem with its worked solution, as the conversation the graders accept
    after the template's `<think>\\n` prompt: reasoning in the think block, then
    `<answer>…</answer>` as the content."""
    return [
        {"role": "user", "content": problem.prompt},
        {
            "role": "assistant",
            "reasoning_content": problem.solution.reasoning,
            "content": f"<answer>{problem.solution.answer}</answer>",
        },
    ]


# --------------------------------------------------------------------------------------- the loader
class ChatLoader:
    """Packs tokenized conversations into rows of seq_len + 1 tokens;
    yields (inputs[B,T], targets[B,T]).

    Every row holds whole conversations (each starts with BOS, as documents do in pretraining),
    placed first-fit among the last `window` open rows in a shuffled order; the rest of a row is
    padding. Targets are the next token where that token is trainable, IGNORE_INDEX elsewhere
    (prompts, padding, the next conversation's BOS). Conversations longer than a row are left out
    and counted in `dropped`.

    The packing of epoch e depends only on (seed, e), so the stream position is (epoch, row):
    state_dict() / load_state_dict() resume exactly. Rows are dealt round-robin to ranks.
    epochs=None repeats forever.
    """

    def __init__(
        self,
        examples: Sequence[tuple[list[int], list[bool]]],
        batch_size: int,
        seq_len: int,
        *,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        epochs: int | None = None,
        window: int = 32,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(
                f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        kept = [(ids, mask) for ids, mask in examples if len(ids) <= seq_len + 1 and any(mask[1:])]
        self.dropped = len(examples) - len(kept)
        if not kept:
            raise ValueError(
                f"none of the {len(examples)} conversations fits "
                f"in seq_len={seq_len} with something to learn"
            )
        self.examples = kept
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epochs = epochs
        self.window = window
        self.epoch = self.row = 0
        self._rows_cache: tuple[int, list[list[int]]] | None = None

    def _rows(self, epoch: int) -> list[list[int]]:
        """This rank's rows of epoch `epoch`, each a list of example indices."""
        if self._rows_cache is None or self._rows_cache[0] != epoch:
            n = len(self.examples)
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            # free[j]: room left in rows[j]; only the last `window` rows take new examples
            rows, free = [], []
            for i in order.tolist():
                size = len(self.examples[i][0])
                start = max(0, len(rows) - self.window)
                j = next((j for j in range(start, len(rows)) if free[j] >= size), None)
                if j is None:
                    rows.append([])
                    free.append(self.seq_len + 1)
                    j = len(rows) - 1
                rows[j].append(i)
                free[j] -= size
            if len(rows) < self.world_size:
                raise ValueError(
                    f"{len(rows)} packed rows cannot feed {self.world_size} ranks: more data needed"
                )
            self._rows_cache = (epoch, rows[self.rank :: self.world_size])
        return self._rows_cache[1]

    @property
    def rows_per_epoch(self) -> int:
        return len(self._rows(self.epoch))

    def _row_tensors(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        trainable = np.zeros(self.seq_len + 1, dtype=bool)
        n = 0
        for i in indices:
            ids, mask = self.examples[i]
            tokens[n : n + len(ids)] = ids
            trainable[n : n + len(ids)] = mask
            n += len(ids)
        return tokens, trainable

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        while len(rows) < self.batch_size:
            if self.epochs is not None and self.epoch >= self.epochs:
                break
            epoch_rows = self._rows(self.epoch)
            rows.append(self._row_tensors(epoch_rows[self.row]))
            self.row += 1
            if self.row == len(epoch_rows):
                self.epoch += 1
                self.row = 0
        if not rows:
            raise StopIteration
        tokens = torch.from_numpy(np.stack([t for t, _ in rows]))
        trainable = torch.from_numpy(np.stack([m for _, m in rows]))
        inputs = tokens[:, :-1].contiguous()
        targets = torch.where(trainable[:, 1:], tokens[:, 1:], IGNORE_INDEX).contiguous()
        return inputs, targets

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "row": self.row,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "examples": len(self.examples),
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "shuffle", "examples", "seq_len"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"loader state is for {key}={state.get(key)!r}, this loader has {mine[key]!r}"
                )
        self.epoch = state["epoch"]
        self.row = state["row"]
