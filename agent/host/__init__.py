"""Everything that touches the host: one module per program or kernel feature.

Orchestration code imports these interfaces only; argument lists are built by
pure functions that unit tests check without running anything.
"""
