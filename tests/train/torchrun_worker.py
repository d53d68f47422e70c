"""Run by each rank under torchrun in the reliability tests: train from a config file, with faults injected.

    python -m torch.distributed.run ... tests/train/torchrun_worker.py CONFIG.json RESULT_DIR [FAULTS_JSON]

Faults (all optional): ``nan_rank`` + ``nan_steps`` (a list, or "all"): that rank's loss is NaN on those
steps; ``sigterm_at``: rank 0 sends itself SIGTERM once the step has been logged; ``kill_at``: rank 0
kills itself (SIGKILL) at that step, on torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0).
Each rank writes ``rank<R>.json``: its result, or the exception it ended with.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch


def _inject_nan(rank: int, faults: dict) -> None:
    import lresnet.model.partial_fc as pfc

    if "nan_rank" not in faults:
        return
    # every rank wraps its head (the same parameter names everywhere); only one gets NaN losses
    steps = faults["nan_steps"] if faults["nan_rank"] == rank else []
    real = pfc.create_head

    class NaNHead(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head, self.calls = head, 0

        def forward(self, emb, labels):
            self.calls += 1
            loss = self.head(emb, labels)
            return loss * float("nan") if steps == "all" or self.calls in steps else loss

        def full_state_dict(self):
            return self.head.full_state_dict()

        def load_full_state_dict(self, state):
            self.head.load_full_state_dict(state)

    pfc.create_head = lambda *a, **k: NaNHead(real(*a, **k))


def main(config_path: str, result_dir: str, faults_json: str = "{}") -> None:
    from lresnet.core.interrupt import Interrupted
    from lresnet.train.config import build_config
    from lresnet.train.loop import train

    faults = json.loads(faults_json)
    rank = int(os.environ.get("RANK", "0"))
    _inject_nan(rank, faults)

    def progress(record: dict) -> None:
        if record["step"] == faults.get("sigterm_at"):
            os.kill(os.getpid(), signal.SIGTERM)
        if record["step"] == faults.get("kill_at") and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)

    out = Path(result_dir) / f"rank{rank}.json"
    try:
        result = train(build_config(config_file=config_path), progress=progress)
    except (Exception, Interrupted) as err:  # the test reads what ended the run on each rank
        out.write_text(json.dumps({"error": type(err).__name__, "message": str(err)}))
        raise SystemExit(1)
    out.write_text(json.dumps({"steps": result.steps, "start_step": result.start_step,
                               "skipped_steps": result.skipped_steps}))


if __name__ == "__main__":
    main(*sys.argv[1:])
