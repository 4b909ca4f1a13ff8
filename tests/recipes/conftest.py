"""Recipe tests compare runs made by separate processes (an uninterrupted run against a killed and
resumed one, one rank against two). Each process would calibrate its own CPU rates, and near a tie
two calibrations may pick different compute paths for a layer (results then differ by ~1e-7): the
preset rates make the choice the same in every process, as the README's reproducibility notes say."""
import pytest


@pytest.fixture(autouse=True)
def _same_path_choice_in_every_process(monkeypatch):
    monkeypatch.setenv("SLCOMPILE_CALIBRATE", "0")
