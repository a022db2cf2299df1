"""What every resumable run shares: its folder (:class:`RunFolder`: the checkpoint, the log and the resolved config,
and how a run starts or resumes in it), its device, checkpoints written whole, and the one guarded road by which
retfm reads any pickled checkpoint (its own and published weights alike)."""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from retfm.config import save_config
from retfm.errors import RetfmError

CHECKPOINT_FILENAME = "checkpoint.pt"
LOG_FILENAME = "log.jsonl"


class RunFolder:
    """The folder of a resumable training run (``retfm pretrain``, ``finetune``, ``synth train``): ``checkpoint.pt``
    (the resolved config beside what the loop saves, written whole), ``log.jsonl`` (one JSON record per logged
    step or epoch) and the resolved config as YAML (``config_name``). A new run never overwrites an old one; a
    resumed one needs a checkpoint made with the same config, and runs again what followed its checkpoint, so its
    log is cut back to the checkpoint's ``state[position]`` (``"step"`` or ``"epoch"``)."""

    def __init__(self, out: Path, config, config_name: str, resume: bool, position: str = "step"):
        self.out, self.config, self.config_name = Path(out), config, config_name
        self.resume, self.position = resume, position
        self.checkpoint, self.log_file = self.out / CHECKPOINT_FILENAME, self.out / LOG_FILENAME
        refuse_overwrite(self.out, resume)
        if resume and not self.checkpoint.exists():
            raise RetfmError(f"{self.checkpoint}: nothing to resume")

    def open(self, writer: bool = True) -> dict | None:
        """Resumed: the checkpoint's content, and the log cut back to it. New: None, and the folder holding the
        config and no log. Only a ``writer`` changes files (in a distributed run, the first process)."""
        if self.resume:
            saved = load_own_checkpoint(self.checkpoint, self.config)
            if writer and self.log_file.exists():
                done = saved["state"][self.position]
                kept = [line for line in self.log_file.read_text().splitlines()
                        if json.loads(line)[self.position] <= done]
                self.log_file.write_text("".join(line + "\n" for line in kept))
            return saved
        if writer:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.out / self.config_name)
            self.log_file.unlink(missing_ok=True)
        return None

    def log(self, record: dict) -> None:
        with open(self.log_file, "a") as log:
            log.write(json.dumps(record) + "\n")

    def save(self, **parts) -> None:
        """The checkpoint: the run's config and ``parts`` (its state, weights, optimiser, RNG states, ...)."""
        save_whole({"config": self.config.model_dump_json(), **parts}, self.checkpoint)


def refuse_overwrite(out: Path, resume: bool) -> None:
    """A run folder holding a checkpoint is continued (``resume``), never started again."""
    if (Path(out) / CHECKPOINT_FILENAME).exists() and not resume:
        raise RetfmError(f"{out}: holds a run already; pass --resume to continue it, or choose a new --out")


def checked_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RetfmError("--device cuda: no CUDA device is available here (use --device cpu)")
    return torch.device(name)


def save_whole(payload: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a checkpoint exists whole or not at all."""
    partial = path.with_name(path.name + ".tmp")
    torch.save(payload, partial)
    partial.replace(path)


def load_checkpoint(path: Path, allowed_globals: Sequence[type] = ()):
    """``torch.load(path, weights_only=True)``, its failures as one line naming the file and the reason. The
    weights-only unpickler refuses, with ``pickle.UnpicklingError``, anything but tensors, plain containers and
    ``allowed_globals``: objects whose loading could run code, and bytes no ``torch.save`` wrote (it cannot tell
    these apart). retfm never retries without it, whatever torch's own message suggests."""
    with torch.serialization.safe_globals(list(allowed_globals)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the outcome is said below, in one line
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            named = _named_globals(path)
            if named:
                raise RetfmError(f"{path}: refused: an unsafe pickle (it calls {named}); loading it fully would run "
                                 "that code, which retfm never does (it loads with weights_only=True): re-save "
                                 "just the state dict") from None
            raise RetfmError(f"{path}: not a checkpoint retfm can load safely: torch's weights-only loader refused "
                             "it as an unsafe or damaged pickle (loading it fully could run code, which retfm "
                             "never does)") from None
        except Exception as exc:  # RuntimeError, EOFError, KeyError, IndexError, OSError, ... on a damaged file
            raise RetfmError(f"{path}: not a readable PyTorch checkpoint, damaged or truncated "
                             f"({type(exc).__name__})") from None


def _named_globals(path: Path) -> str:
    """The code a refused checkpoint would call, read without running it (zip checkpoints only)."""
    try:
        return ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a legacy or damaged pickle: nothing to name
        return ""


def read_json(path: Path):
    """A JSON file a run wrote (metrics, provenance, what fills a folder), its damage said in one line."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RetfmError(f"{path}: not readable JSON, damaged or truncated ({type(exc).__name__})") from None


def load_own_checkpoint(path: Path, config) -> dict:
    """A run's checkpoint, refused unless it was made with the same resolved config (a pydantic model)."""
    saved = load_checkpoint(path)
    if not isinstance(saved, dict) or "config" not in saved:
        raise RetfmError(f"{path}: not a retfm run checkpoint (no config inside)")
    if saved["config"] != config.model_dump_json():
        raise RetfmError(f"{path}: was made with another config; resume with the same options")
    return saved
