"""histo-dist: distributed training for histopathology patch classification."""

__version__ = "0.1.0"
