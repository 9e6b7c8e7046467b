"""shell/client.py: the in-process Device and the HTTP RemoteClient are the same Client to the shell."""
from hublab.runtime.serve.device import Device
from hublab.shell.client import Client, RemoteClient

from protocols import protocol_members, signature_problems


def test_device_and_remote_client_implement_the_client_protocol():
    methods, attrs = protocol_members(Client)
    assert {"ask", "route", "list", "load", "close"} <= set(methods) and attrs == ["local"]
    for cls in (Device, RemoteClient):
        assert signature_problems(Client, cls) == []
    assert Device.local and not RemoteClient.local


def test_a_method_missing_or_out_of_step_is_caught():
    class Stale:
        local = False

        def route(self, query: str, strategy: str | None = None) -> dict:  # renamed argument
            return {}

        def stats(self, name: str) -> dict:  # an argument the shell does not pass
            return {}

    problems = signature_problems(Client, Stale)
    assert any(p.startswith("Stale.route: strategy") for p in problems), problems
    assert "Stale.stats requires ['name'], which Client does not pass" in problems
    assert "Stale has no method ask" in problems
