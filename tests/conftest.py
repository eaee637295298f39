from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def noisy_data(tmp_path_factory) -> Path:
    from gradsel.demo.tasks import write_regime

    out = tmp_path_factory.mktemp("noisy")
    write_regime(out, "noisy", size=60, val_size=12, seed=0)
    return out
