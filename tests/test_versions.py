"""The dependency ranges we declare are the ones CI runs: pyproject.toml's lower bounds are exactly what
`scripts/setup.sh --lowest` installs, and the running environment lies inside the declared ranges."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from hf_gqa import compat

ROOT = Path(__file__).resolve().parent.parent
TESTED = ("torch", "transformers", "accelerate", "peft", "lm-eval")


def declared() -> dict[str, Requirement]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, dependencies)}


def lowest() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "scripts" / "lowest-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            pins[name] = Version(pinned)
    return pins


def test_lowest_versions_are_the_declared_lower_bounds():
    requirements, pins = declared(), lowest()
    assert set(pins) == set(TESTED)
    for name in TESTED:
        lower = [Version(s.version) for s in requirements[name].specifier if s.operator == ">="]
        assert lower == [pins[name]], (name, requirements[name], pins[name])
        assert any(s.operator == "<" for s in requirements[name].specifier), f"{name} has no tested upper end"


def test_installed_versions_lie_in_the_declared_ranges():
    for name, requirement in declared().items():
        if name in TESTED:
            installed = Version(version(name))
            assert requirement.specifier.contains(installed, prereleases=True), (name, installed, requirement)


def test_compat_states_the_declared_transformers_range():
    specifier = declared()["transformers"].specifier
    low, high = (Version(v) for v in compat.TESTED_TRANSFORMERS)
    assert specifier.contains(low) and specifier.contains(high)
    assert not specifier.contains(Version(f"{high.major}.{high.minor + 1}.0"))
    assert not specifier.contains(Version(f"{low.major}.{low.minor - 1}.0"))
