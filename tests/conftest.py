"""Test session setup: offline, quiet, deterministic, and small thread pools.

The environment is set before torch or any Hugging Face library is imported, because several of them read it
only once, at import time.
"""

import importlib.util
import os
from pathlib import Path
from types import ModuleType

for _flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_flag] = "1"
os.environ["TQDM_DISABLE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# With OpenMP's default busy-waiting, two threads on a shared or busy 2-core machine make every tiny op take
# milliseconds (a tiny UNet forward went from 25 ms to 3 s); passive waiting removes that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs two workers) each worker gets one thread: the tiny test models gain
# nothing from a second thread, and two workers x two threads would oversubscribe the two cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(filename: str, module_name: str | None = None) -> ModuleType:
    """``scripts/<filename>`` as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(module_name or Path(filename).stem, SCRIPTS / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="session")
def _quiet_progress_bars():
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def family(request):
    """Each model family in turn (as a ``ModelFamily``)."""
    from erasure.pipeline import ModelFamily

    return ModelFamily(request.param)


@pytest.fixture
def tiny_pipe(family):
    """A fresh tiny pipeline of each family (safe to modify)."""
    from erasure.testing import tiny_pipeline

    return tiny_pipeline(family)
