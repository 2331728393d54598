"""Fixtures of the reliability suite; helpers are in rel_helpers.py (on the path: pyproject's pytest `pythonpath`)."""
import pytest
from rel_helpers import tree


@pytest.fixture
def sandbox(tmp_path):
    """Inputs go in sandbox/"in", outputs in sandbox/"out"; afterwards nothing else may exist under tmp_path
    (a member name like `../x` must never become a file beside or above the output directory)."""
    (tmp_path / "in").mkdir()
    before = tree(tmp_path)
    yield tmp_path
    new = {p for p in tree(tmp_path) - before if not p.startswith(("in/", "out/")) and p not in ("in", "out")}
    assert not new, f"written outside the output directory: {sorted(new)}"
    escaped = [p for p in tmp_path.parent.iterdir() if p.name in ("x", "x.png", "escape.png", "evil.png")]
    assert not escaped, f"written above the sandbox: {escaped}"
