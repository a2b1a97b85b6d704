"""What the installed package carries besides its modules."""

from __future__ import annotations

import importlib.metadata
import importlib.resources

from packaging.requirements import Requirement


def test_the_package_says_it_has_type_hints():
    # PEP 561: without this marker, mypy ignores the hints of an installed package.
    assert (importlib.resources.files("proxy") / "py.typed").is_file()


def test_the_default_install_brings_uvloop_where_it_exists():
    # What `pip install mdcloud-proxy` gives is what users run: uvloop, not an extra.
    requirements = [Requirement(text) for text in importlib.metadata.requires("mdcloud-proxy")]
    (uvloop,) = [each for each in requirements if each.name == "uvloop"]
    assert uvloop.marker is not None
    assert uvloop.marker.evaluate({"extra": ""})  # CPython on Linux: installed
    assert not uvloop.marker.evaluate({"extra": "", "sys_platform": "win32"})
    assert not uvloop.marker.evaluate({"extra": "", "platform_python_implementation": "PyPy"})
