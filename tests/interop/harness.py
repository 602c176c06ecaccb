"""Starts a real Synapse and a Hearth binary that federate over loopback (self-signed TLS), for interop tests.

Synapse comes from a virtualenv: $SYNAPSE_PYTHON, else target/synapse-venv/bin/python (what .ci/run installs),
else the shared lab's ~/.cache/hearth-synapse-lab/venv/bin/python.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from lab import req  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def synapse_python():
    for cand in [os.environ.get("SYNAPSE_PYTHON"), os.path.join(ROOT, "target", "synapse-venv", "bin", "python"),
                 os.path.expanduser("~/.cache/hearth-synapse-lab/venv/bin/python")]:
        if cand and os.path.exists(cand):
            return cand
    raise RuntimeError("no Synapse virtualenv found: run .ci/run or set SYNAPSE_PYTHON")


def self_signed(dirname, name):
    crt, key = os.path.join(dirname, name + ".crt"), os.path.join(dirname, name + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365", "-keyout", key,
                    "-out", crt, "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return crt, key


def wait_http(url, proc, what, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            req(url, "GET", "/_matrix/client/versions", timeout=2)
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up")


class Synapse:
    def __init__(self, workdir, peers, full_join=False):
        self.dir = os.path.join(workdir, "synapse")
        os.makedirs(os.path.join(self.dir, "media"), exist_ok=True)
        self.fed_port, self.cli_port = free_port(), free_port()
        self.server_name = f"127.0.0.1:{self.fed_port}"
        self.url = f"http://127.0.0.1:{self.cli_port}"
        self.secret = "interop-secret"
        self.full_join = full_join
        crt, key = self_signed(self.dir, "tls")
        whitelist = [self.server_name] + peers
        with open(os.path.join(self.dir, "log.yaml"), "w") as f:
            f.write(f"""version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(levelname)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: {self.dir}/homeserver.log
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
""")
        rl = "{per_second: 1000, burst_count: 10000}"
        with open(os.path.join(self.dir, "homeserver.yaml"), "w") as f:
            f.write(f"""server_name: "{self.server_name}"
pid_file: {self.dir}/homeserver.pid
report_stats: false
signing_key_path: {self.dir}/signing.key
log_config: {self.dir}/log.yaml
media_store_path: {self.dir}/media
listeners:
  - port: {self.cli_port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    resources: [{{names: [client], compress: false}}]
  - port: {self.fed_port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: true
    resources: [{{names: [federation], compress: false}}]
tls_certificate_path: {crt}
tls_private_key_path: {key}
database:
  name: sqlite3
  args: {{database: {self.dir}/homeserver.db}}
federation_verify_certificates: false
federation_ip_range_blacklist: []
federation_domain_whitelist: {whitelist!r}
trusted_key_servers: []
suppress_key_server_warning: true
enable_registration: false
registration_shared_secret: "{self.secret}"
macaroon_secret_key: "interop-macaroon"
form_secret: "interop-form"
bcrypt_rounds: 4
rc_joins: {{local: {rl}, remote: {rl}}}
rc_joins_per_room: {rl}
rc_message: {rl}
rc_registration: {rl}
rc_login: {{address: {rl}, account: {rl}}}
rc_invites: {{per_room: {rl}, per_user: {rl}, per_issuer: {rl}}}
rc_room_creation: {rl}
url_preview_enabled: false
""")
        py = synapse_python()
        subprocess.run([py, "-m", "synapse.app.homeserver", "-c", os.path.join(self.dir, "homeserver.yaml"),
                        "--generate-keys"], check=True, capture_output=True)
        self.py = py
        self.proc = None

    def start(self):
        entry = ["-m", "synapse.app.homeserver"]
        if self.full_join:
            entry = [os.path.join(os.path.dirname(__file__), "synapse_fulljoin.py")]
        self.proc = subprocess.Popen([self.py, *entry, "-c", os.path.join(self.dir, "homeserver.yaml")],
                                     stdout=open(os.path.join(self.dir, "stdout"), "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_http(self.url, self.proc, "synapse")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


class Hearth:
    def __init__(self, workdir, extra_toml=""):
        self.dir = os.path.join(workdir, "hearth")
        os.makedirs(self.dir, exist_ok=True)
        self.fed_port, self.cli_port = free_port(), free_port()
        self.server_name = f"127.0.0.1:{self.fed_port}"
        self.url = f"http://127.0.0.1:{self.cli_port}"
        crt, key = self_signed(self.dir, "tls")
        self.config = os.path.join(self.dir, "hearth.toml")
        with open(self.config, "w") as f:
            f.write(f"""server_name = "{self.server_name}"
[listen]
client = "127.0.0.1:{self.cli_port}"
federation = "127.0.0.1:{self.fed_port}"
[database]
path = "{self.dir}/hearth.db"
[registration]
enabled = true
[limits]
messages_per_second = 1000.0
registrations_per_second = 1000.0
registrations_burst = 1000
joins_per_second = 1000.0
joins_burst = 1000
[federation]
trusted_key_servers = []
verify_certificates = false
allow_private_ips = true
tls_cert = "{crt}"
tls_key = "{key}"
[log]
level = "info,ruma_state_res=warn,hearth=debug"
{extra_toml}
""")
        self.bin = os.environ.get("HEARTHTEST_BIN") or os.path.join(ROOT, "target", "debug", "hearth")
        self.proc = None

    def start(self):
        # Every HEARTH_* variable is a config key to the server: pass none of them on (test switches use HEARTHTEST_*).
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
        self.proc = subprocess.Popen([self.bin, "-c", self.config], stdout=open(os.path.join(self.dir, "log"), "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True, env=env)
        wait_http(self.url, self.proc, "hearth")

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Lab:
    """One Hearth and one Synapse that allow each other."""

    def __init__(self, synapse_full_join=False, hearth_toml=""):
        self.work = tempfile.mkdtemp(prefix="hearth-interop-")
        self.hearth = Hearth(self.work, hearth_toml)
        self.synapse = Synapse(self.work, [self.hearth.server_name], full_join=synapse_full_join)

    def __enter__(self):
        self.hearth.start()
        self.synapse.start()
        return self

    def __exit__(self, *exc):
        self.hearth.stop()
        self.synapse.stop()
        if exc[0] is None and not os.environ.get("KEEP_LAB"):
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            print(f"lab kept at {self.work}", file=sys.stderr)
            for name in ["hearth/log", "synapse/homeserver.log"]:
                path = os.path.join(self.work, name)
                if os.path.exists(path):
                    lines = open(path, errors="replace").read().splitlines()[-40:]
                    print(f"---- tail of {name}", *lines, sep="\n", file=sys.stderr)
        return False
