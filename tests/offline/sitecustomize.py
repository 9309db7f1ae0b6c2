"""The offline promise, enforced: every Python process the tests start (pytest itself, job
subprocesses, Ray heads, Ray workers) imports this at start-up, because tests/conftest.py puts
this folder on PYTHONPATH and Python imports `sitecustomize` from there. With IMGPIPE_OFFLINE=1
it refuses TCP connections to anything but this machine, so code that would download weights or
data at run time fails here as it would on a user's air-gapped cluster, instead of passing here
because the internet happened to be reachable.

Only TCP connects are refused (a UDP connect sends nothing: Ray uses one to find its own IP).
"""

from __future__ import annotations

import ipaddress
import os
import socket


class NetworkRefused(ConnectionRefusedError):
    """A test process tried to reach a host other than this machine."""


def _local_addresses() -> set[str]:
    addresses = {"0.0.0.0", "::"}
    try:
        import psutil

        for entries in psutil.net_if_addrs().values():
            addresses.update(e.address.split("%")[0] for e in entries if e.family in (socket.AF_INET, socket.AF_INET6))
    except Exception:  # no psutil (a bare interpreter): loopback only
        pass
    return addresses


def install() -> None:
    """Refuse TCP connections to non-local addresses in this process (idempotent)."""
    if getattr(socket.socket.connect, "offline_guard", False):
        return
    local = _local_addresses()
    connect, connect_ex, resolve = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def is_local(host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:  # a name: local only if every address it has is
            try:
                return all(is_local(info[4][0]) for info in resolve(host, None))
            except OSError:
                return False
        return ip.is_loopback or str(ip) in local

    def check(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            if not is_local(str(address[0])):
                raise NetworkRefused(
                    f"offline tests: a connection to {address[0]}:{address[1]} was refused; imgpipe must run "
                    "without the internet (tests/offline/sitecustomize.py)"
                )

    def guarded_connect(self, address):
        check(self, address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        check(self, address)
        return connect_ex(self, address)

    guarded_connect.offline_guard = True
    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex


if os.environ.get("IMGPIPE_OFFLINE") == "1":
    install()
