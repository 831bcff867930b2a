"""The one exception the server's request path raises, rendered as OpenAI's error body."""
from __future__ import annotations

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An HTTP error with OpenAI's body `{"error": {"message", "type", "param", "code"}}`.

    status: the HTTP status (400 bad input, 401 key, 404 unknown model or route, 413 too large,
    500 our fault, 503 overloaded or not running). param: the request field at fault, if one is.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)
