"""Orchestration: the driver (`patchscope sweep`), the scheduler (tasks onto Ray actors) and the
cluster connection."""
