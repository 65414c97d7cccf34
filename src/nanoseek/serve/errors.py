"""APIError: any refusal, as an OpenAI error object with its HTTP status (or, on the Anthropic
routes, as an Anthropic error object)."""

from __future__ import annotations

from nanoseek.serve import protocol

ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
# Anthropic's error types by status; other statuses (408, 415, 503, 504, ...) as below
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class APIError(Exception):
    """Any refusal: becomes {"error": {"message", "type", "param", "code"}} with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        if status == 401:  # RFC 9110: a 401 names the scheme that would pass
            self.headers.setdefault("WWW-Authenticate", "Bearer")

    def body(self) -> dict:
        return {
            "error": protocol.ErrorBody(
                message=self.message, type=self.type, param=self.param, code=self.code
            ).model_dump()
        }

    def anthropic_body(self) -> dict:
        """{"type": "error", "error": {"type", "message"}}: Anthropic's shape, which has no param
        field, so the message names the field."""
        message = self.message
        if self.param and not message.startswith(self.param):
            message = f"{self.param}: {message}"
        kind = ANTHROPIC_TYPES.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def body_for(self, path: str) -> dict:
        """The error object the route at `path` speaks."""
        return self.anthropic_body() if path in ANTHROPIC_PATHS else self.body()
