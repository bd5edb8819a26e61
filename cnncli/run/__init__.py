"""Run plumbing: the run directory on disk, its Orbax checkpoints, and the processes of a multi-host run."""
