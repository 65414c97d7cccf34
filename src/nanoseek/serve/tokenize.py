"""The tokenizer over HTTP, in vLLM's shapes: POST /tokenize (a text prompt, or chat messages: the
ids the completions and chat endpoints would run), POST /detokenize, and GET /tokenizer_info (the
tokenizer's configuration, as tokenizer_config.json holds it: what lm-evaluation-harness's
`local-completions` probes to tokenize remotely, with no tokenizer files on its side)."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import Response

from nanoseek.serve import protocol
from nanoseek.serve.chat_format import (
    FormatError,
    chat_request_prompt,
    chat_turn,
    completion_prompt,
    with_tools,
)
from nanoseek.serve.errors import APIError
from nanoseek.serve.openai import OpenAIAPI, _json, _text_bytes
from nanoseek.tokenizer import CHAT_TEMPLATE


class TokenizerAPI:
    """/tokenize, /detokenize and /tokenizer_info of a Server (its admission checks included)."""

    def __init__(self, api: OpenAIAPI):
        self.api = api
        self.server = api.server

    async def tokenize(self, request: Request) -> Response:
        self.server.authorize(request)
        self.server.ready()
        body = await self.server.body(request)
        chat = _has_messages(body)
        model = protocol.TokenizeChatRequest if chat else protocol.TokenizeCompletionRequest
        req = self._parse(model, body)
        if chat:
            messages = [m.as_dict() for m in req.messages]
            tools = [t.as_dict() for t in req.tools or []]
            text = [
                [m.get("content"), m.get("reasoning_content"), m.get("tool_calls")]
                for m in messages
            ]
            self.server.check_bytes(_text_bytes([text, tools]), "messages")
            self.api._tool_format(messages, tools)  # a model that cannot call tools: 400
        else:
            self.server.check_bytes(_text_bytes(req.prompt), "prompt")
        try:
            images = await self.api.request_images(req.messages) if chat else (None, None)
            ids = await asyncio.to_thread(self._ids, req, images)
        except FormatError as e:
            raise APIError(400, str(e), param=e.param) from None
        tok = self.server.tok
        return _json(
            protocol.TokenizeResponse(
                count=len(ids),
                max_model_len=self.server.engine.max_model_len,
                tokens=ids,
                token_strs=[tok.id_to_token(i) for i in ids] if req.return_token_strs else None,
            )
        )

    def _ids(self, req, images=(None, None)) -> list[int]:
        tok = self.server.tok
        if isinstance(req, protocol.TokenizeCompletionRequest):
            if req.add_special_tokens:
                return completion_prompt(tok, req.prompt, None)
            return tok.encode(req.prompt)
        thinking = req.thinking_enabled(self.api.config.thinking)
        messages = [m.as_dict() for m in req.messages]
        tools = [t.as_dict() for t in req.tools or []]
        if req.continue_final_message:
            messages[-1]["prefix"] = True
        if req.add_generation_prompt or req.continue_final_message:
            # the chat endpoint's own function: the same prompt, tools and prefilled call
            ids, _, _ = chat_request_prompt(
                tok, messages, thinking, tools, req.tool_choice_name, *images
            )
        else:
            if images[0] is not None:
                raise FormatError(
                    "images are counted with add_generation_prompt or continue_final_message "
                    "(as the chat endpoint runs them)",
                    "messages",
                )
            turns, kwargs = with_tools(
                tok, [{**chat_turn(m), **_reasoning(m)} for m in messages], tools
            )
            ids = tok.apply_chat_template(turns, thinking=thinking, sanitize=True, **kwargs)
        if req.add_special_tokens and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return ids

    async def detokenize(self, request: Request) -> Response:
        self.server.authorize(request)
        self.server.ready()
        req = self._parse(protocol.DetokenizeRequest, await self.server.body(request))
        vocab = self.server.table.size
        if any(t >= vocab for t in req.tokens):
            raise APIError(400, f"tokens must lie in [0, {vocab}), the vocabulary", param="tokens")
        if len(req.tokens) > self.server.engine.max_model_len:
            raise APIError(
                400,
                f"{len(req.tokens)} tokens are more than this model's context "
                f"({self.server.engine.max_model_len})",
                param="tokens",
            )
        text = await asyncio.to_thread(self.server.tok.decode, req.tokens)
        return _json(protocol.DetokenizeResponse(prompt=text))

    def tokenizer_info(self, request: Request) -> Response:
        """What transformers' tokenizer_config.json says of this tokenizer (vLLM's
        /tokenizer_info): its class, special tokens, length limit and chat template."""
        self.server.authorize(request)
        self.server.ready()
        tok = self.server.tok
        name = tok.id_to_token
        eos = name(tok.eos_id)
        info = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(tok.bos_id),
            "eos_token": eos,
            "pad_token": name(tok.pad_id),
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": tok.model_max_length,
            "chat_template": getattr(tok, "chat_template", None) or CHAT_TEMPLATE,
        }
        return _json_dict(info)

    def _parse(self, model, body: bytes):
        try:
            req = protocol.parse(model, body)
        except protocol.ProtocolError as e:
            raise APIError(400, str(e), param=e.param) from None
        name = self.api.config.model_name
        if req.model is not None and req.model != name:
            raise APIError(
                404,
                f"The model `{req.model}` does not exist. This server serves `{name}`.",
                "not_found_error",
                "model",
                "model_not_found",
            )
        return req


def _has_messages(body: bytes) -> bool:
    """Whether a /tokenize body is the chat form (a "messages" key), without a second full parse:
    a malformed body goes to the text form, whose parse names what is wrong."""
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, dict) and "messages" in value


def _reasoning(message: dict) -> dict:
    r = message.get("reasoning_content")
    return {} if r is None else {"reasoning_content": r}


def _json_dict(value: dict) -> Response:
    return Response(json.dumps(value, ensure_ascii=False), media_type="application/json")
