"""Ports for a run's sockets come from below the ephemeral range, so no connection can take them first."""

import socket

from asyncrl.ports import _ephemeral_start, free_port


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    port = free_port()
    assert port < _ephemeral_start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
