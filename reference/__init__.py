"""ftref: a test-driven reference implementation of LoRA/QLoRA fine-tuning methods.

Light modules (steps, formats, recipes, filters) import no torch; heavy ones import it inside functions.
"""

__version__ = "0.1.0"
