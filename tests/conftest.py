"""Session-wide test environment: everything offline, every cache and Prefect home in a temp dir."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_TMP = tempfile.mkdtemp(prefix="trace-rl-tests-")
os.environ.setdefault("PREFECT_HOME", os.path.join(_TMP, "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_API_URL", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(_TMP, "hf"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The full local data files (never in the repo): ../shared/data next to the checkout, or
# $TRACE_SHARED_DATA (point it at a missing folder to run as a fresh clone does). Tests that
# need them use `needs_shared_data` and skip with the reason when they are absent.
SHARED_DATA = Path(os.environ.get("TRACE_SHARED_DATA") or ROOT.parent / "shared" / "data")

import pytest  # noqa: E402

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the full data files are not present at {SHARED_DATA} (TRACE_SHARED_DATA)"
)


@pytest.fixture
def hub_mirror(tmp_path, monkeypatch) -> Path:
    """The working directory becomes a folder holding every catalog repo in hub layout with
    synthetic rows (tests/fixtures/hub_sources.py), so `datasets.load_dataset("<org>/<name>")`
    reads them offline through its usual code path."""
    from fixtures.hub_sources import write_hub_layout

    root = write_hub_layout(tmp_path / "hub")
    monkeypatch.chdir(root)
    return root


from tiny import TINY_TESTBED  # noqa: E402  (tests/tiny.py: the shared tiny models)


@pytest.fixture(scope="session")
def tiny_testbed_dir(tmp_path_factory) -> str:
    """A tiny testbed built once per test session."""
    from trace_rl.stages.config import load_config
    from trace_rl.testbed.build import build_testbed

    cfg = load_config("demo", TINY_TESTBED)
    return build_testbed(cfg.model.testbed, str(tmp_path_factory.mktemp("testbed") / "tb"), progress=False)


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness: a temporary database and API for flows run in this process."""
    import trace_rl.flows  # noqa: F401  (sets Prefect's environment defaults before it is imported)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
