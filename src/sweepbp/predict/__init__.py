"""mode=predict: a job's step traced on tensors without data for a target device, the kernels that device
would pick, batch.size=auto, and a closed-form cross-check. Uses sweepbp.train, never the job's recipe."""
