"""efforting-ci: a CI host agent (see README.md and DESIGN in the docs)."""

__version__ = "0.1.0"
