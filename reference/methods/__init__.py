"""The training methods, each a reference.training.runs.Method: supervised fine-tuning (with its data, padding-free
batches and chunked loss), continuation from an adapter, DPO, and the LMSYS preference classifier.
"""
