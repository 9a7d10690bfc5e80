"""Inference: retrieved few-shot prompts, generation with the seed's settings, and scoring how well a model predicts
answers.
"""
