"""The test tiers (CONTRIBUTING.md): slow tests are marked explicitly, and one that loads a real model through a
fixture without the marker is refused at collection, so the fast tier never loads a real model by accident."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ("pytester",)

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


def project(pytester) -> None:
    """The suite's conftest and its `slow` marker, in pytester's folder."""
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n")


def test_a_real_model_fixture_without_the_slow_marker_is_refused(pytester):
    project(pytester)
    pytester.makepyfile(
        test_x="""
        import pytest

        def test_unmarked(default_model):
            pass

        @pytest.mark.slow
        def test_marked(default_model):
            pass
    """
    )
    result = pytester.runpytest_inprocess("--collect-only", "-q", "-m", "not slow")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*not marked slow*test_x.py::test_unmarked*"])
    assert "test_marked" not in result.stderr.str()


def test_only_the_marker_makes_a_test_slow(pytester):
    """Nothing is inferred from a test's source: a test that merely names a loader stays in the fast tier."""
    project(pytester)
    pytester.makepyfile(
        test_y="""
        import subprocess
        import pytest

        def test_fast():
            assert "load_default(" and subprocess

        @pytest.mark.slow
        def test_slow():
            pass
    """
    )
    result = pytester.runpytest_inprocess("-q", "-m", "not slow")
    result.assert_outcomes(passed=1, deselected=1)
