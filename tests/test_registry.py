"""runtime/pkg/registry.py: the directory and the OCI registry are both a Registry to pkg."""
from hublab.runtime.pkg.registry import DirRegistry, OCIRegistry, Registry

from protocols import protocol_members, signature_problems


def test_dir_and_oci_registries_implement_the_registry_protocol():
    methods, attrs = protocol_members(Registry)
    assert {"get_manifest", "open_blob", "push_blob", "push_manifest", "close"} <= set(methods)
    assert attrs == ["location"]
    for cls in (DirRegistry, OCIRegistry):
        assert signature_problems(Registry, cls) == []


def test_instances_have_a_location(tmp_path):
    reg = OCIRegistry("http://127.0.0.1:9", timeout=1)
    assert reg.location == "http://127.0.0.1:9"
    reg.close()
    assert DirRegistry(tmp_path).location == str(tmp_path)
