"""The CI rules of tests/conftest.py, run on small throw-away test files: under RECBOLE_MM_CI=1 a skip
fails unless the test is GPU-only or needs an extra this venv does not install; an extra listed in
RECBOLE_MM_REQUIRE_EXTRAS must import; an installed package that does not import always fails."""
import pytest

pytest_plugins = ["pytester"]

TESTS = '''
import pytest
from tests.conftest import import_extra

def test_plain_skip():
    pytest.skip("the data was not there")

def test_gpu_only():
    pytest.skip("needs CUDA")

def test_absent_extra():
    import_extra("recbole_mm_no_such_module", "encode")

def test_broken_package():
    import_extra("broken_package_for_ci_rules", "encode")
'''


@pytest.fixture
def suite(pytester, monkeypatch):
    pytester.makeconftest("from tests.conftest import pytest_runtest_makereport  # noqa: F401\n")
    pytester.makepyfile(test_rules=TESTS, broken_package_for_ci_rules="raise ImportError('half-built')\n")
    monkeypatch.delenv("RECBOLE_MM_CI", raising=False)
    monkeypatch.delenv("RECBOLE_MM_REQUIRE_EXTRAS", raising=False)
    return pytester, monkeypatch


def outcomes(pytester):
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA")
    return {report.nodeid.split("::")[1]: report.outcome
            for report in result.reprec.getreports("pytest_runtest_logreport")
            if report.when == "call" or report.outcome != "passed"}


def test_outside_ci_skips_stay_skips_but_a_broken_package_fails(suite):
    pytester, _ = suite
    assert outcomes(pytester) == {"test_plain_skip": "skipped", "test_gpu_only": "skipped",
                                  "test_absent_extra": "skipped", "test_broken_package": "failed"}


def test_under_ci_only_gpu_and_uninstalled_extra_skips_are_allowed(suite):
    pytester, monkeypatch = suite
    monkeypatch.setenv("RECBOLE_MM_CI", "1")
    assert outcomes(pytester) == {"test_plain_skip": "failed", "test_gpu_only": "skipped",
                                  "test_absent_extra": "skipped", "test_broken_package": "failed"}
    monkeypatch.setenv("RECBOLE_MM_REQUIRE_EXTRAS", "ray,encode")  # CI installed the extra: it must import
    assert outcomes(pytester)["test_absent_extra"] == "failed"
