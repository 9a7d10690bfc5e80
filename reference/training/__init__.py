"""The run every training method follows: the skeleton (runs), its run directory, complete checkpoints, progress lines,
manifest and verify, the step plan and schedule, and FSDP.
"""
