import importlib
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from recbole_mm.config import DATA_ENV_VAR, default_data_path

REQUIRE_DATA_ENV = "RECBOLE_MM_REQUIRE_DATA"
# Extras whose tests must run (comma-separated, e.g. "encode"): .ci/run lists the extras it installs on
# purpose, so a missing or broken one fails there instead of skipping (docs/development.md, "CI").
REQUIRE_EXTRAS_ENV = "RECBOLE_MM_REQUIRE_EXTRAS"
# Set by .ci/run: the only skips allowed are GPU-only tests without CUDA and tests of an extra that this
# venv does not install (import_extra); any other skip is reported as a failure.
CI_ENV = "RECBOLE_MM_CI"
UNINSTALLED_EXTRA_SKIP = "not installed in this environment: needs the"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The test suite's shared datasets: $RECBOLE_MM_DATA, else a shared/datasets folder beside the checkout.
os.environ.setdefault(DATA_ENV_VAR, str(PROJECT_ROOT.parent / "shared" / "datasets"))

# The fast subset that .ci/run also runs on the newest numpy / pandas (`pytest -m stack`): the modules
# that drive RecBole's data pipeline, the trainer and the dataset converters on real files.
STACK_TEST_MODULES = {
    "test_compat", "test_config", "test_feature_hook", "test_candidates", "test_mmsasrec", "test_trainer",
    "test_cli", "test_dataset_conversion",
}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get(CI_ENV) != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    if "CUDA" in reason or UNINSTALLED_EXTRA_SKIP in reason:
        return
    report.outcome = "failed"
    report.longrepr = (f"{CI_ENV}=1 (.ci/run): only GPU-only tests may skip here, but this test skipped: {reason}. "
                       "Install what it needs in CI, or make it pass without it.")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in STACK_TEST_MODULES:
            item.add_marker(pytest.mark.stack)


def shared_dataset_dir(name):
    """The shared dataset folder; a skip where absent, a failure under CI (RECBOLE_MM_REQUIRE_DATA=1)."""
    path = default_data_path() / name
    if not path.is_dir():
        message = f"dataset {name} not found at {path} (set RECBOLE_MM_DATA)"
        if os.environ.get(REQUIRE_DATA_ENV) == "1":
            pytest.fail(message + f"; {REQUIRE_DATA_ENV}=1 makes this a failure")
        pytest.skip(message)
    return path


def required_extras():
    return {name.strip() for name in os.environ.get(REQUIRE_EXTRAS_ENV, "").split(",") if name.strip()}


def import_extra(module, extra, broken_means_absent=False):
    """``module`` of the ``extra`` install (setup.cfg), imported. Where it does not import: a failure
    when ``extra`` is in $RECBOLE_MM_REQUIRE_EXTRAS (CI installed it on purpose) or when the package is
    installed but broken (a broken build must not look green); else a skip saying how to install it.
    ``broken_means_absent``: an installed package that does not import without the extra counts as
    absent (RecBole installs ray 2.6.3, which imports only with the ray extra's setuptools<81)."""
    try:
        return importlib.import_module(module)
    except Exception as error:  # ImportError, or whatever a broken package raises while importing
        install = f"pip install -e '.[{extra}]'"
        if extra in required_extras():
            pytest.fail(f"{module} does not import ({type(error).__name__}: {error}), but {REQUIRE_EXTRAS_ENV} "
                        f"lists the {extra} extra: install it with {install}")
        if importlib.util.find_spec(module.split(".")[0]) is not None and not broken_means_absent:
            pytest.fail(f"{module} is installed but does not import ({type(error).__name__}: {error})")
        pytest.skip(f"{module} is {UNINSTALLED_EXTRA_SKIP} {extra} extra ({install})")


@pytest.fixture(scope="session")
def scientific_dir():
    return shared_dataset_dir("Scientific")


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    """Run in a temporary directory so saved/ and log/ land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_scientific_slice(scientific_dir, root, n_users=120, name="SciSlice"):
    """A small benchmark-format copy of Scientific (first n_users users) under root/name.

    Features stay the full 1585-row tables, so the UniSRec row mapping is exercised unchanged.
    """
    target = Path(root) / name
    target.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        lines = (scientific_dir / f"Scientific.{split}.inter").read_text().splitlines()
        kept = [lines[0]] + [line for line in lines[1:] if int(line.split("\t")[0]) < n_users]
        (target / f"{name}.{split}.inter").write_text("\n".join(kept) + "\n")
    for suffix in ("feat1CLS", "feat3CLS", "item2index"):
        shutil.copy(scientific_dir / f"Scientific.{suffix}", target / f"{name}.{suffix}")
    return target


def scientific_slice_config(data_root, name="SciSlice", **overrides):
    """Config dict for a dataset written by write_scientific_slice, mirroring Scientific.yaml."""
    config = {
        "data_path": str(data_root),
        "benchmark_filename": ["train", "valid", "test"],
        "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
        "TIME_FIELD": None,
        "modalities": ["text", "image"],
        "feature_tables": {
            "text": {"path": f"{name}.feat1CLS", "dim": 512},
            "image": {"path": f"{name}.feat3CLS", "dim": 512},
        },
        "show_progress": False,
        "epochs": 1,
        "hidden_size": 16,
        "inner_size": 32,
        "train_batch_size": 256,
        "eval_batch_size": 256,
    }
    config.update(overrides)
    return config


def write_timestamped_dataset(root, name="TimeToy", n_users=40, n_items=30, dim=8, seed=0):
    """A normal-mode dataset: one .inter with real-valued timestamps, ASIN-like tokens, .npy features."""
    rng = np.random.default_rng(seed)
    target = Path(root) / name
    target.mkdir(parents=True)
    tokens = [f"I{index:04d}" for index in range(n_items)]
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(n_users):
        items = rng.choice(n_items, size=rng.integers(5, 9), replace=False)
        times = np.sort(rng.integers(1_000_000, 2_000_000, size=len(items)))
        lines += [f"U{user}\t{tokens[item]}\t{time}" for item, time in zip(items, times)]
    (target / f"{name}.inter").write_text("\n".join(lines) + "\n")
    # rows in a shuffled order, so the item2index mapping is really exercised
    order = rng.permutation(n_items)
    (target / f"{name}.item2index").write_text("".join(f"{tokens[i]}\t{row}\n" for row, i in enumerate(order)))
    features = rng.standard_normal((n_items, dim)).astype(np.float32)
    np.save(target / f"{name}.text.npy", features)
    np.save(target / f"{name}.image.npy", features[:, ::-1].copy())
    return target, tokens, order, features
