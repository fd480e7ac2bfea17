"""Measurement: the exact memory tracker (real and data-less tensors alike), memory snapshots, step timing, and
the device's own figures. The only code that touches allocators (import-linter checks it)."""
