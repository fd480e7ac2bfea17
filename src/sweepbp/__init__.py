"""sweepbp: sweep the compute-versus-memory trade-off of backpropagation in fine-tuning."""

import logging

__version__ = "0.1.0"

# bitsandbytes (the `.[quant]` extra) warns at import, on CPUs with AVX512-BF16, that an optional inference
# kernel package is missing; peft imports it in every job. Training never uses that kernel: keep it quiet.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
