"""The run folder every training loop shares: no overwrite, resume only with the same config, the log cut back to
the checkpoint."""

import json

import pytest

from retfm.data.config import IngestConfig
from retfm.errors import RetfmError
from retfm.runs import RunFolder


def _logged(folder) -> list[int]:
    return [json.loads(line)["epoch"] for line in (folder / "log.jsonl").read_text().splitlines()]


def test_a_resumed_run_cuts_its_log_back_to_its_checkpoint(tmp_path):
    folder, config = tmp_path / "run", IngestConfig()
    run = RunFolder(folder, config, "run_config.yaml", resume=False, position="epoch")
    assert run.open() is None and (folder / "run_config.yaml").is_file()
    run.log({"epoch": 1})
    run.log({"epoch": 2})
    run.save(state={"epoch": 2}, rng=[1, 2])
    run.log({"epoch": 3})  # logged, then the run was stopped before its checkpoint
    with pytest.raises(RetfmError, match="holds a run already"):
        RunFolder(folder, config, "run_config.yaml", resume=False)
    with pytest.raises(RetfmError, match="another config"):
        RunFolder(folder, IngestConfig(size=64), "run_config.yaml", resume=True).open()
    assert _logged(folder) == [1, 2, 3]
    saved = RunFolder(folder, config, "run_config.yaml", resume=True, position="epoch").open()
    assert saved["state"] == {"epoch": 2} and saved["rng"] == [1, 2] and _logged(folder) == [1, 2]


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(RetfmError, match="nothing to resume"):
        RunFolder(tmp_path, IngestConfig(), "run_config.yaml", resume=True)
