"""The launcher's free ports (serve/local.py): Ray's components each get one of their own.

A clean-clone CI run failed once because the OS handed the same just-closed port to the Ray
client server and the dashboard agent, and `ray start` refused both ("used by other components")."""
from __future__ import annotations

import socket

from serve import local


def test_free_ports_are_never_handed_out_twice(monkeypatch):
    ports = iter([41001, 41001, 41002, 41001, 41003])

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(ports)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(local, "_HANDED_OUT", set())
    monkeypatch.setattr(socket, "socket", FakeSocket)
    assert [local.free_port(), local.free_port(), local.free_port()] == [41001, 41002, 41003]
