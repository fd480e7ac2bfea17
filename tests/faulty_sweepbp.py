"""`python -m sweepbp` with faults injected into chosen jobs, for the failure tests. Test code only.

Run as `python tests/faulty_sweepbp.py ARGS` (the same `sweepbp.cli.main.main` as `python -m sweepbp ARGS`), or
`python tests/faulty_sweepbp.py --rerun RUN_ID` (`python -m sweepbp.rerun RUN_ID`).
The job whose `trainer.seed` equals
  SWEEPBP_FAULT_FAIL_SEED  raises RuntimeError("injected fault") in its second training step (-> failed);
  SWEEPBP_FAULT_HANG_SEED  writes its process id to the file SWEEPBP_FAULT_MARK in its second training
                           step (in its prediction, for mode=predict), then sleeps until a signal stops it: a
                           job caught mid-training, every time.
  SWEEPBP_FAULT_WAIT_SEED  writes its process id to SWEEPBP_FAULT_MARK in its second training step, then waits
                           until the file SWEEPBP_FAULT_GO exists and trains on: the test acts in between
                           (stops the tracking server while this job runs).
Jobs are forked from the sweep process itself (SWEEPBP_START_METHOD=fork, set below), so the patches made
here reach them; the default fork server would import clean copies of the modules.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

FAIL, HANG, MARK = "SWEEPBP_FAULT_FAIL_SEED", "SWEEPBP_FAULT_HANG_SEED", "SWEEPBP_FAULT_MARK"
WAIT, GO = "SWEEPBP_FAULT_WAIT_SEED", "SWEEPBP_FAULT_GO"


def install() -> None:
    """Wrap the job recipe and the training step with the faults the environment asks for."""
    import sweepbp.job
    import sweepbp.train.module

    fit = sweepbp.job.measure_job
    step = sweepbp.train.module.LoraFinetune.training_step
    predict = sweepbp.job.predict_job
    seed: list[int] = []

    def fit_with_faults(run, *args, **kwargs):
        seed.append(run.cfg.trainer.seed)
        return fit(run, *args, **kwargs)

    def step_with_faults(self, batch, batch_idx):
        if batch_idx == 1 and seed and str(seed[-1]) == os.environ.get(FAIL):
            raise RuntimeError("injected fault")
        if batch_idx == 1 and seed and str(seed[-1]) == os.environ.get(HANG):
            hang()
        if batch_idx == 1 and seed and str(seed[-1]) == os.environ.get(WAIT):
            Path(os.environ[MARK]).write_text(str(os.getpid()))
            while not Path(os.environ[GO]).exists():
                time.sleep(0.05)
        return step(self, batch, batch_idx)

    def predict_with_faults(run, *args, **kwargs):
        if str(run.cfg.trainer.seed) == os.environ.get(HANG):
            hang()
        return predict(run, *args, **kwargs)

    def hang():
        Path(os.environ[MARK]).write_text(str(os.getpid()))
        while True:  # the job's signal handler raises out of this sleep
            time.sleep(0.05)

    sweepbp.job.measure_job = fit_with_faults
    sweepbp.job.predict_job = predict_with_faults
    sweepbp.train.module.LoraFinetune.training_step = step_with_faults


if __name__ == "__main__":
    os.environ["SWEEPBP_START_METHOD"] = "fork"
    install()
    if sys.argv[1:2] == ["--rerun"]:
        from sweepbp.rerun import command_line

        del sys.argv[1]
        raise SystemExit(command_line())
    from sweepbp.cli.main import main

    main()
