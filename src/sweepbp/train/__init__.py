"""Building blocks of a job: the model, the LoRA adapter, token batches, the Lightning module and its
training step, devices and ranks, FLOPs. Used by the job's recipe (sweepbp.job) and by predictions."""
