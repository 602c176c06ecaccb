#!/usr/bin/env python3
"""Builds tests/schema/hearth-openapi.json: one self-contained OpenAPI 3.1 document for schemathesis.

The Matrix spec's OpenAPI definitions (matrix-org/matrix-spec, `data/api/`) are one fragment per API area, each with
its own base path under `servers` and relative `$ref`s into `definitions/`, `event-schemas/` and `examples/`. This
script merges the client-server fragments and the unauthenticated federation ones (server keys, version) into one
document: every path is prefixed with its fragment's base path, every `$ref` (internal or external) is inlined, and
only the operations Hearth implements (OPERATIONS below) are kept. The result is committed, so CI does not need the
spec checkout; rerun this script after upgrading the spec copy or adding endpoints:

    python3 tests/schema/bundle.py [SPEC_DIR]      # default: ../shared/matrix-spec (from the repo root)

Needs PyYAML (installed with schemathesis, tests/schema/requirements.txt).
"""
import json
import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (method, full path) of every spec operation Hearth serves on its client listener (src/client/mod.rs,
# src/media/mod.rs) plus the federation endpoints that need no X-Matrix signature.
# Left out on purpose: logout, logout/all (they would revoke the token the run authenticates with).
OPERATIONS = [
    ("get", "/_matrix/client/versions"),
    ("get", "/.well-known/matrix/client"),
    ("get", "/_matrix/client/v3/login"),
    ("post", "/_matrix/client/v3/login"),
    ("post", "/_matrix/client/v3/register"),
    ("get", "/_matrix/client/v3/register/available"),
    ("get", "/_matrix/client/v1/register/m.login.registration_token/validity"),
    ("get", "/_matrix/client/v3/account/whoami"),
    ("post", "/_matrix/client/v3/account/password"),
    ("get", "/_matrix/client/v3/capabilities"),
    ("post", "/_matrix/client/v3/user/{userId}/filter"),
    ("get", "/_matrix/client/v3/user/{userId}/filter/{filterId}"),
    ("get", "/_matrix/client/v3/devices"),
    ("get", "/_matrix/client/v3/devices/{deviceId}"),
    ("put", "/_matrix/client/v3/devices/{deviceId}"),
    ("delete", "/_matrix/client/v3/devices/{deviceId}"),
    ("post", "/_matrix/client/v3/delete_devices"),
    ("get", "/_matrix/client/v3/profile/{userId}"),
    ("get", "/_matrix/client/v3/profile/{userId}/{keyName}"),
    ("put", "/_matrix/client/v3/profile/{userId}/{keyName}"),
    ("post", "/_matrix/client/v3/createRoom"),
    ("post", "/_matrix/client/v3/join/{roomIdOrAlias}"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/join"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/leave"),
    ("post", "/_matrix/client/v3/knock/{roomIdOrAlias}"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/forget"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/invite"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/kick"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/ban"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/unban"),
    ("get", "/_matrix/client/v3/joined_rooms"),
    ("put", "/_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}"),
    ("put", "/_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/state"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}"),
    ("put", "/_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/event/{eventId}"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/members"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/joined_members"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/aliases"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/messages"),
    ("get", "/_matrix/client/v3/rooms/{roomId}/context/{eventId}"),
    ("get", "/_matrix/client/v3/directory/room/{roomAlias}"),
    ("put", "/_matrix/client/v3/directory/room/{roomAlias}"),
    ("delete", "/_matrix/client/v3/directory/room/{roomAlias}"),
    ("get", "/_matrix/client/v3/directory/list/room/{roomId}"),
    ("put", "/_matrix/client/v3/directory/list/room/{roomId}"),
    ("get", "/_matrix/client/v3/publicRooms"),
    ("post", "/_matrix/client/v3/publicRooms"),
    ("get", "/_matrix/client/v3/sync"),
    ("get", "/_matrix/client/v3/user/{userId}/account_data/{type}"),
    ("put", "/_matrix/client/v3/user/{userId}/account_data/{type}"),
    ("get", "/_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}"),
    ("put", "/_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}"),
    ("put", "/_matrix/client/v3/rooms/{roomId}/typing/{userId}"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/read_markers"),
    ("get", "/_matrix/client/v3/pushrules/"),
    ("get", "/_matrix/client/v3/pushrules/global/"),
    ("get", "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}"),
    ("put", "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}"),
    ("delete", "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}"),
    ("get", "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions"),
    ("put", "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions"),
    ("get", "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled"),
    ("put", "/_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled"),
    ("post", "/_matrix/client/v3/keys/upload"),
    ("post", "/_matrix/client/v3/keys/query"),
    ("post", "/_matrix/client/v3/keys/claim"),
    ("get", "/_matrix/client/v3/keys/changes"),
    ("post", "/_matrix/client/v3/keys/device_signing/upload"),
    ("post", "/_matrix/client/v3/keys/signatures/upload"),
    ("put", "/_matrix/client/v3/sendToDevice/{eventType}/{txnId}"),
    ("get", "/_matrix/client/v3/room_keys/version"),
    ("post", "/_matrix/client/v3/room_keys/version"),
    ("get", "/_matrix/client/v3/room_keys/version/{version}"),
    ("put", "/_matrix/client/v3/room_keys/version/{version}"),
    ("delete", "/_matrix/client/v3/room_keys/version/{version}"),
    ("get", "/_matrix/client/v3/room_keys/keys"),
    ("put", "/_matrix/client/v3/room_keys/keys"),
    ("delete", "/_matrix/client/v3/room_keys/keys"),
    ("get", "/_matrix/client/v3/room_keys/keys/{roomId}"),
    ("put", "/_matrix/client/v3/room_keys/keys/{roomId}"),
    ("delete", "/_matrix/client/v3/room_keys/keys/{roomId}"),
    ("get", "/_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}"),
    ("put", "/_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}"),
    ("delete", "/_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}"),
    ("get", "/_matrix/client/v3/user/{userId}/rooms/{roomId}/tags"),
    ("put", "/_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}"),
    ("delete", "/_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}"),
    ("get", "/_matrix/client/v3/presence/{userId}/status"),
    ("put", "/_matrix/client/v3/presence/{userId}/status"),
    ("get", "/_matrix/client/v3/pushers"),
    ("get", "/_matrix/client/v3/thirdparty/protocols"),
    ("get", "/_matrix/client/v3/voip/turnServer"),
    ("get", "/_matrix/client/v3/account/3pid"),
    ("post", "/_matrix/client/v3/user_directory/search"),
    # spaces (src/client/spaces.rs)
    ("get", "/_matrix/client/v1/rooms/{roomId}/hierarchy"),
    ("get", "/_matrix/client/v1/room_summary/{roomIdOrAlias}"),
    ("post", "/_matrix/client/v3/search"),
    ("post", "/_matrix/client/v3/rooms/{roomId}/upgrade"),
    # relations and threads (src/client/relations.rs)
    ("get", "/_matrix/client/v1/rooms/{roomId}/relations/{eventId}"),
    ("get", "/_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}"),
    ("get", "/_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}/{eventType}"),
    ("get", "/_matrix/client/v1/rooms/{roomId}/threads"),
    # media (src/media/mod.rs)
    ("get", "/_matrix/client/v1/media/config"),
    ("get", "/_matrix/client/v1/media/download/{serverName}/{mediaId}"),
    ("get", "/_matrix/client/v1/media/download/{serverName}/{mediaId}/{fileName}"),
    ("get", "/_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}"),
    ("post", "/_matrix/media/v1/create"),
    ("post", "/_matrix/media/v3/upload"),
    ("put", "/_matrix/media/v3/upload/{serverName}/{mediaId}"),
    # federation, no X-Matrix needed (served on the client listener with federation.serve_on_client_listener)
    ("get", "/_matrix/federation/v1/version"),
    ("get", "/_matrix/key/v2/server"),
    ("post", "/_matrix/key/v2/query"),
]

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


class Bundler:
    def __init__(self):
        self.files = {}

    def load(self, path):
        path = os.path.normpath(path)
        if path not in self.files:
            with open(path) as f:
                self.files[path] = yaml.safe_load(f)
        return self.files[path]

    def resolve(self, ref, base_file):
        file_part, _, pointer = ref.partition("#")
        target_file = os.path.normpath(os.path.join(os.path.dirname(base_file), file_part)) if file_part else base_file
        node = self.load(target_file)
        for part in [p for p in pointer.split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node, target_file, (target_file, pointer)

    def inline(self, node, base_file, stack=()):
        """A copy of `node` with every $ref replaced by its target (siblings of $ref win over the target's keys)."""
        if isinstance(node, list):
            return [self.inline(v, base_file, stack) for v in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target, target_file, key = self.resolve(node["$ref"], base_file)
            if key in stack:
                # A recursive schema: allow anything below this point.
                return {}
            out = self.inline(target, target_file, stack + (key,))
            siblings = {k: self.inline(v, base_file, stack) for k, v in node.items() if k != "$ref"}
            if isinstance(out, dict):
                out = dict(out)
                out.update(siblings)
            return out
        return {k: self.inline(v, base_file, stack) for k, v in node.items()}


def base_path(doc):
    servers = doc.get("servers") or [{}]
    return servers[0].get("variables", {}).get("basePath", {}).get("default", "")


def apply_errata(paths):
    """Corrections to the spec's schemas where they cannot be met as written (each says why)."""
    # GET .../state/{type}/{key} answers either the content or, with `format=event`, the whole event. The spec
    # says `oneOf` [object, ClientEvent], but a whole event is an object too, so every `format=event` answer
    # matches both and fails `oneOf` (Complement's TestRoomState asks for the whole event): `anyOf` is meant.
    op = paths["/_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}"]["get"]
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    if "oneOf" in schema:
        schema["anyOf"] = schema.pop("oneOf")


def main():
    spec = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "..", "shared", "matrix-spec")
    api = os.path.join(spec, "data", "api")
    sources = [os.path.join(api, "client-server", f) for f in sorted(os.listdir(os.path.join(api, "client-server"))) if f.endswith(".yaml")]
    sources += [os.path.join(api, "server-server", f) for f in ("version.yaml", "keys_server.yaml", "keys_query.yaml")]
    b = Bundler()
    paths = {}
    security_schemes = {}
    for src in sources:
        doc = b.load(src)
        prefix = base_path(doc)
        for p, item in (doc.get("paths") or {}).items():
            full = prefix + p
            for method, op in item.items():
                if method in HTTP_METHODS:
                    paths.setdefault(full, {})[method] = (op, src, item.get("parameters"))
        for name, scheme in ((doc.get("components") or {}).get("securitySchemes") or {}).items():
            security_schemes[name] = b.inline(scheme, src)

    out_paths = {}
    missing = []
    for method, path in OPERATIONS:
        found = paths.get(path, {}).get(method)
        if not found:
            missing.append(f"{method.upper()} {path}")
            continue
        op, src, shared_params = found
        op = b.inline(op, src)
        if shared_params:
            op["parameters"] = b.inline(shared_params, src) + op.get("parameters", [])
        op.pop("x-addedInMatrixVersion", None)
        out_paths.setdefault(path, {})[method] = op
    if missing:
        sys.exit("operations not in the spec: " + ", ".join(missing))
    apply_errata(out_paths)

    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "Matrix client-server API (operations Hearth implements) and unauthenticated federation endpoints",
            "version": "matrix-spec " + spec_commit(spec),
            "description": "Generated by tests/schema/bundle.py from the Matrix spec's OpenAPI definitions (Apache-2.0).",
        },
        "servers": [{"url": "http://localhost:8008"}],
        "paths": out_paths,
        "components": {"securitySchemes": security_schemes},
    }
    dest = os.path.join(ROOT, "tests", "schema", "hearth-openapi.json")
    with open(dest, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    n = sum(len(v) for v in out_paths.values())
    print(f"wrote {dest}: {n} operations, {os.path.getsize(dest)} bytes")


def spec_commit(spec):
    try:
        with open(os.path.join(spec, "README.md")) as f:
            for word in f.read().split():
                if len(word) == 40 and all(c in "0123456789abcdef" for c in word):
                    return word
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
