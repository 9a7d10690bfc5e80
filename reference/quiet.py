"""Third-party messages that ask the user to do something pointless, silenced; the project's own never are.

* bitsandbytes, on a CPU with AVX512-BF16, tries to fetch a faster 4-bit kernel through the optional
  `kernels` package (from the model hub) and, when it cannot, logs "Failed to load CPU gemm_4bit_forward
  from kernels-community ... Please make sure you already `pip install kernels`". Nothing is missing: it
  falls back to its own kernel, and with no hub the install would not help. A filter on that logger drops
  this one message and nothing else.
* transformers, for an FSDP run with `activation_checkpointing`, advises FSDP's own `fsdp_config` checkpointing
  instead. With an adapter that advice breaks the run (FSDP's checkpoint wrapper renames the layers, and peft 0.21
  then saves an empty adapter), so the project keeps the Trainer's checkpointing and refuses FSDP's with an adapter
  (reference/training/distributed.py); the advice is dropped, and nothing else of that logger.
* Weight-loading progress bars ("Loading weights: 100%|...") when stderr is not a terminal: in a log file
  or a pipe they are carriage-return clutter. In a terminal they stay. HF_HUB_DISABLE_PROGRESS_BARS, when
  the user set it, is left as it is.

`install()` must run before the first model loads (the kernels message is logged when bitsandbytes is
imported); the command line calls it first thing.
"""

from __future__ import annotations

import logging
import os
import sys

KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_HINT = "Failed to load CPU gemm_4bit_forward"
FSDP_LOGGER = "transformers.training_args"
FSDP_CHECKPOINTING_HINT = "When using FSDP, prefer `fsdp_config['activation_checkpointing']`"
POINTLESS = {KERNELS_LOGGER: KERNELS_HINT, FSDP_LOGGER: FSDP_CHECKPOINTING_HINT}
"""Per logger, the start of the one message of it that is dropped."""


class DropMessage(logging.Filter):
    """Drops the records whose message starts with `prefix`; lets every other record through."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def install(stream=None) -> None:
    """Silence the messages above; `stream` is where progress would go (default: stderr)."""
    for name, prefix in POINTLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(DropMessage(prefix))
    if (stream or sys.stderr).isatty() or "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:  # transformers copies the setting when it is imported
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
