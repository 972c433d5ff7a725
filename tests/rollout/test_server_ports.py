"""SGLang servers started by this code take their HTTP port below the ephemeral range
(rollout/sglang/server.py::free_server_port): an ephemeral port from bind(0) can be handed out
again before the server binds it (SGLang's own sockets took one in a CI run)."""

from __future__ import annotations

import socket

import pytest

from megatron_ivr.rollout.sglang.server import SERVER_PORTS, free_server_port


def test_server_ports_come_from_below_the_ephemeral_range():
    port = free_server_port()
    assert 30000 <= port < 32768 and SERVER_PORTS.stop <= 32768
    with socket.socket() as held:  # a port that is taken is skipped
        held.bind(("127.0.0.1", port))
        assert free_server_port(range(port, port + 2)) == port + 1
        with pytest.raises(RuntimeError, match="no free port"):
            free_server_port(range(port, port + 1))
