"""The sweep process: Hydra's task, one forked process per job (and per rank), signals, progress, the
sweep's end. It records every job and never imports torch itself; the job runs in sweepbp.job."""
