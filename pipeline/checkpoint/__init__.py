"""Where a run lives and what survives it: the run directory and its lock, the resume contract, checkpoint
records written atomically, saving and loading."""
