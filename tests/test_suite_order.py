"""The suite's scheduling hint names real modules: a renamed or deleted test module left in
LONGEST_MODULES would silently lose its place at the front."""

from tests.conftest import LONGEST_MODULES, REPO_ROOT


def test_every_module_the_suite_starts_first_exists():
    missing = [path for path in LONGEST_MODULES if not (REPO_ROOT / path).is_file()]
    assert missing == [], f"LONGEST_MODULES names modules that do not exist: {missing}"
    assert sorted(LONGEST_MODULES.values(), reverse=True) == list(LONGEST_MODULES.values())  # kept longest first, as read
