"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``.

The official SDK maps the status code to its exception class (400 ``BadRequestError``,
401 ``AuthenticationError``, 403 ``PermissionDeniedError``, 404 ``NotFoundError``,
409 ``ConflictError``, 5xx ``InternalServerError``), so every gateway failure is one of these.
Client mistakes (4xx other than 408/429) carry ``x-should-retry: false``: the SDK would
otherwise retry a 409 (and any 5xx), repeating a request that cannot succeed.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}


class GatewayError(Exception):
    """An error the gateway reports to the client with an HTTP status and an OpenAI body.

    Attributes:
        status: the HTTP status code.
        message: a message naming the cause and the fix.
        param: the offending request field, if any.
        code: a short machine-readable code (e.g. ``"model_not_found"``).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        """The OpenAI-format error body."""
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "server_error" if self.status >= 500 else
                                   "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        """A Starlette response carrying this error (plus ``headers``)."""
        extra = dict(headers or {})
        if 400 <= self.status < 500 and self.status not in (408, 429):
            extra.setdefault("x-should-retry", "false")
        return JSONResponse(self.body(), status_code=self.status, headers=extra)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    """A 400 error (invalid JSON, bad parameters, context length exceeded)."""
    return GatewayError(400, message, param=param, code=code)


def unauthorized(message: str) -> GatewayError:
    """A 401 error (missing or unknown API key)."""
    return GatewayError(401, message, code="invalid_api_key")


def forbidden(message: str) -> GatewayError:
    """A 403 error (a session key touching another session or an admin route)."""
    return GatewayError(403, message, code="forbidden")


def not_found(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    """A 404 error (unknown model, session, turn or route)."""
    return GatewayError(404, message, param=param, code=code)


def conflict(message: str, code: str) -> GatewayError:
    """A 409 error (a request the session's state forbids, e.g. a reward after ``end``)."""
    return GatewayError(409, message, code=code)


async def route_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no route) and 405 (wrong method) as OpenAI-format JSON (the
    app's ``HTTPException`` handler)."""
    assert isinstance(exc, HTTPException)
    method, path, headers = request.method, request.url.path, dict(exc.headers or {})
    if exc.status_code == 405:
        return GatewayError(405, f"{method} is not allowed on {path}; use "
                            f"{headers.get('Allow', '')}", code="method_not_allowed"
                            ).response(headers)
    if exc.status_code == 404:
        hint = (" Responses are not stored: POST /v1/responses with the whole conversation "
                "as 'input'." if path.startswith("/v1/responses/") else "")
        return not_found(f"no route {method} {path}; GET /openapi.json lists the gateway's "
                         f"routes.{hint}", code="route_not_found").response()
    return GatewayError(exc.status_code, str(exc.detail)).response(headers)
