"""ftref: a test-driven reference implementation of LoRA/QLoRA fine-tuning methods.

Light modules (steps, formats, recipes, filters) import no torch; modules that need it import it at the top.
"""

__version__ = "0.1.0"
