"""Test-only Lightning callback that freezes a training process at a chosen moment, so that a test can
SIGKILL it exactly there. Given to the real CLI as a config node:
    +trainer.callbacks.freeze._target_=fault_injection.FreezeAt +trainer.callbacks.freeze.step=9 ...
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import lightning as L
import torch


class FreezeAt(L.Callback):
    """``during_save=False``: freeze before training the batch that follows ``step`` optimizer steps
    (mid-epoch, between checkpoints). ``during_save=True``: freeze in the middle of writing the
    checkpoint of ``step``, after half of its bytes went to the file. Either way ``marker`` is
    written first, so the test knows when to kill."""

    def __init__(self, step: int, marker: str, during_save: bool = False) -> None:
        self.step, self.marker, self.during_save = int(step), Path(marker), bool(during_save)

    def _freeze(self) -> None:
        self.marker.write_text(str(self.step))
        time.sleep(3600)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.during_save:
            return
        real_save = torch.save

        def save_then_freeze(obj, f, *args, **kwargs):
            if not (isinstance(obj, dict) and obj.get("global_step") == self.step and hasattr(f, "write")):
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            self._freeze()

        torch.save = save_then_freeze

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if not self.during_save and trainer.global_step == self.step:
            self._freeze()
