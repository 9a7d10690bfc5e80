"""The data and its filter: records read from files in every shape the field uses, the LLM2024 quality filter (fast, and
the seed's algorithm literally), the character statistics it needs, and the synthetic corpora its benchmark uses.
"""
