"""APIError: any refusal, as an OpenAI error object with its HTTP status."""

from __future__ import annotations

from nanoseek.serve import protocol


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
