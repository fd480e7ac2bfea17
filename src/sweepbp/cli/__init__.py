"""The command line: `python -m sweepbp`, pre-flight checks of every job, --help, launcher presets.
No torch here (import-linter checks it): a typo costs a fraction of a second and prints one line."""
