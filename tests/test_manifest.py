"""package.toml's `requires`: PEP 440 specifiers, read as pip reads them for an installed hublab."""
import pytest

from hublab.runtime.pkg.manifest import ManifestError, manifest_from_dict, requirement_met


@pytest.mark.parametrize("spec, version, met", [
    ("", "0.1.0", True),
    (">=0.1, <2", "0.1.0", True),
    (">=0.2", "0.1.9", False),
    ("~=0.1.0", "0.1.7", True),      # compatible release: 0.1.*, at least 0.1.0
    ("~=0.1.0", "0.2.0", False),
    ("~=0.1", "0.9.3", True),        # ~=0.1 means >=0.1, ==0.*
    ("~=0.1", "1.0.0", False),
    (">=0.1", "0.2.0rc1", True),     # an installed pre-release satisfies a plain lower bound
    ("<0.2", "0.2.0rc1", False),     # ...but is not below the release it precedes
    (">=0.2.0rc1", "0.2.0rc2", True),
    (">=0.2", "0.2.0rc1", False),
    ("==0.1.*", "0.1.4", True),
    (">=0.1", "0.1.0+local.build", True),
    ("=>0.1", "0.1.0", False),       # not a specifier: never met
])
def test_requirement_met(spec, version, met):
    assert requirement_met(spec, version) is met


def test_a_requires_pip_cannot_read_is_a_manifest_error():
    data = {"package": {"name": "x", "version": "1.0.0", "category": "expert", "requires": "~=1"}}  # ~= needs two parts
    with pytest.raises(ManifestError, match="not a PEP 440 version specifier"):
        manifest_from_dict(data, "package.toml", built=False)
