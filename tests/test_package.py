"""What the installed package carries besides its modules."""

from __future__ import annotations

import importlib.resources


def test_the_package_says_it_has_type_hints():
    # PEP 561: without this marker, mypy ignores the hints of an installed package.
    assert (importlib.resources.files("proxy") / "py.typed").is_file()
