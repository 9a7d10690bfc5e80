"""The main job (`reproduce`): the LLM2024 pipeline end to end on the embedded fixtures, seed 000's continuation routes
measured, and the report with its charts.
"""
