"""Media between Hearth and a real Synapse: each server's users download (and thumbnail) the other server's uploads
through their own server, which fetches them over federation (`/_matrix/federation/v1/media/download`, multipart,
spec v1.11) and caches them. Run: python3 media.py; exit status 0 = pass.
"""
import os
import struct
import sys
import urllib.error
import urllib.request
import zlib

sys.path.insert(0, os.path.dirname(__file__))
from harness import Lab  # noqa: E402
from lab import hearth_register, synapse_register  # noqa: E402


def png(w, h, rgb):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
    row = b"\x00" + bytes(rgb) * w
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * h)) + chunk(b"IEND", b""))


def http(base, method, path, token, data=None, content_type=None):
    r = urllib.request.Request(base + path, data=data, method=method)
    if token:
        r.add_header("Authorization", "Bearer " + token)
    if content_type:
        r.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(r, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def upload(base, token, data, content_type, name):
    st, _, body = http(base, "POST", f"/_matrix/media/v3/upload?filename={name}", token, data, content_type)
    assert st == 200, (st, body)
    import json
    return json.loads(body)["content_uri"][len("mxc://"):]


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    return struct.unpack(">II", data[16:24])


def main():
    with Lab() as lab:
        H, S = lab.hearth.url, lab.synapse.url
        st_tok, _ = synapse_register(S, lab.synapse.secret, "sam", password="pw")
        ht_tok, _ = hearth_register(H, "hana")
        picture = png(640, 320, (10, 120, 200))

        # Hearth's upload, fetched by Synapse for its user.
        mxc = upload(H, ht_tok, picture, "image/png", "from-hearth.png")
        st, headers, body = http(S, "GET", f"/_matrix/client/v1/media/download/{mxc}", st_tok)
        assert st == 200 and body == picture, (st, len(body), body[:200])
        print(f"synapse served hearth's {mxc} ({headers.get('Content-Type')})")
        st, _, body = http(S, "GET", f"/_matrix/client/v1/media/thumbnail/{mxc}?width=96&height=96&method=crop", st_tok)
        assert st == 200, (st, body[:300])
        print(f"synapse thumbnailed hearth's media: {len(body)} bytes")

        # Synapse's upload, fetched by Hearth for its user (and a thumbnail made by Hearth from its cached copy).
        mxc = upload(S, st_tok, picture, "image/png", "from-synapse.png")
        st, headers, body = http(H, "GET", f"/_matrix/client/v1/media/download/{mxc}", ht_tok)
        assert st == 200 and body == picture, (st, len(body), body[:300])
        assert headers.get("Content-Type") == "image/png", dict(headers)
        assert "from-synapse.png" in headers.get("Content-Disposition", ""), dict(headers)
        print(f"hearth served synapse's {mxc} ({headers.get('Content-Type')}, {headers.get('Content-Disposition')})")
        st, _, body = http(H, "GET", f"/_matrix/client/v1/media/thumbnail/{mxc}?width=320&height=240&method=scale", ht_tok)
        assert st == 200 and png_size(body) == (320, 160), (st, body[:100])
        print("hearth thumbnailed synapse's media: 320x160")
        # Unknown remote media is a clean 404.
        st, _, body = http(H, "GET", f"/_matrix/client/v1/media/download/{lab.synapse.server_name}/nosuchmediaid", ht_tok)
        assert st == 404, (st, body)
    print("media with synapse: ok")


if __name__ == "__main__":
    main()
