"""Checkpoint formats at the boundary of clipforge: reading other projects' files safely, mapping their
parameter names onto ours, and inferring an architecture from tensor shapes. `clipforge.convert` is the
public entry point; these modules are its parts."""

from __future__ import annotations


class CheckpointFormatError(ValueError):
    """A checkpoint cannot be loaded: unknown, unsafe, corrupt, or not the expected architecture.

    The message is one line naming the file and, where there is one, the key that is wrong.
    """
