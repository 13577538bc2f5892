"""A socket guard for the server tests: connections (and datagrams) to any address
outside loopback are refused and recorded. Installed in the test process by
tests/serve_helpers.py and in its subprocesses by tests/netguard/sitecustomize.py."""

from __future__ import annotations

import ipaddress
import os
import socket
import traceback

_installed = False


def _outside(address) -> str | None:
    """The address as text when it is an IP address outside loopback, else None (Unix
    sockets, loopback)."""
    if not isinstance(address, tuple) or not address:
        return None
    host = address[0]
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        try:   # a host name: what it resolves to decides
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return None
        bad = [i[4][0] for i in infos if not ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback]
        return f"{host} ({bad[0]})" if bad else None
    return None if ip.is_loopback else str(ip)


def install(log_path: str) -> None:
    global _installed
    if _installed:
        return
    _installed = True
    original_connect, original_connect_ex, original_sendto = (socket.socket.connect, socket.socket.connect_ex,
                                                              socket.socket.sendto)

    def check(address) -> None:
        bad = _outside(address)
        if bad is not None:
            with open(log_path, "a") as f:
                f.write(f"pid {os.getpid()}: connection to {bad} refused\n{''.join(traceback.format_stack(limit=8))}\n")
            raise ConnectionRefusedError(f"test network guard: {bad} is outside 127.0.0.0/8")

    def connect(self, address):
        check(address)
        return original_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return original_connect_ex(self, address)

    def sendto(self, data, *args):
        check(args[-1])
        return original_sendto(self, data, *args)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
