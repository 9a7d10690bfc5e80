"""Recipes and settings: recipe files and key=value overrides, each setting's type and range, the method sections as
dataclasses, and the mapping onto the installed transformers' TrainingArguments.
"""
