"""The run every training method follows: the skeleton (runs), its run directory, complete checkpoints, progress lines,
manifest and verify, the step plan and schedule, FSDP, the defaults chosen for a CPU (cpu) and which layers
checkpointing recomputes (recompute).
"""
