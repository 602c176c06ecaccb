"""Schemathesis hooks for Hearth (loaded through `hooks = ...` in tests/schema/*.toml).

Registers the checks tests/schemathesis.rs runs besides the built-in ones:

* `matrix_error_body`: every 4xx/5xx answer is a JSON object with a string `errcode` (a Matrix error), or a
  user-interactive-auth challenge (401 with `flows`).
* `matrix_negative_data_rejection`: schemathesis' `negative_data_rejection` (invalid input must get a 4xx), except
  - a request whose fault is a missing body: Hearth reads an empty body as `{}` on purpose (clients POST without
    one) and every operation concerned accepts `{}`;
  - a JSON body with `null` for a field: Hearth (like Synapse) reads `null` for an optional field as absent, since
    clients send it (`"timeout": null`, `"room_alias_name": null`); a required field set to `null` still fails;
* `matrix_response_schema`: schemathesis' `response_schema_conformance`, except for the documented deviations
  listed in KNOWN_DEVIATIONS (each with its reason).
"""
import schemathesis
from schemathesis.specs.openapi.checks import negative_data_rejection, response_schema_conformance

# (method, path template, status) -> why the answer differs from the spec's schema on purpose.
KNOWN_DEVIATIONS = {
    # No TURN server is configured: Synapse answers `{}` too and clients (Element, js-sdk) expect exactly that; the
    # spec's schema has no shape for "no TURN server".
    ("GET", "/_matrix/client/v3/voip/turnServer", 200): "no TURN server configured: `{}` as Synapse",
}


def _json(response):
    try:
        return response.json()
    except Exception:
        return None


@schemathesis.check
def matrix_error_body(ctx, response, case):
    if response.status_code < 400:
        return None
    body = _json(response)
    if response.status_code == 401 and isinstance(body, dict) and isinstance(body.get("flows"), list):
        return None  # user-interactive auth challenge
    if not isinstance(body, dict) or not isinstance(body.get("errcode"), str) or not body["errcode"]:
        raise AssertionError(f"error answer {response.status_code} without a Matrix `errcode`: {response.text[:300]!r}")
    if not isinstance(body.get("error", ""), str):
        raise AssertionError(f"`error` is not a string: {response.text[:300]!r}")
    return None


def _has_null(value):
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_has_null(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_null(v) for v in value)
    return False


@schemathesis.check
def matrix_negative_data_rejection(ctx, response, case):
    meta = case.meta
    data = getattr(getattr(meta, "phase", None), "data", None)
    if getattr(data, "description", None) == "Missing request body":
        return None
    if isinstance(case.body, dict) and _has_null(case.body):
        return None
    return negative_data_rejection(ctx, response, case)


@schemathesis.check
def matrix_response_schema(ctx, response, case):
    key = (case.operation.method.upper(), case.operation.path, response.status_code)
    if key in KNOWN_DEVIATIONS:
        return None
    body = _json(response)
    if (
        response.status_code == 401
        and isinstance(body, dict)
        and body.get("errcode") in ("M_MISSING_TOKEN", "M_UNKNOWN_TOKEN")
    ):
        # The spec documents 401 only as the user-interactive-auth challenge on these operations; a missing or
        # unknown access token is the standard 401 error of every authenticated endpoint.
        return None
    return response_schema_conformance(ctx, response, case)
