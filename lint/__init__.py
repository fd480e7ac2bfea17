"""sweepbp's own import-linter contract types (pyproject.toml, [tool.importlinter]); not shipped."""
