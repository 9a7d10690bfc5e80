"""One module per command: its arguments (`add_arguments`) beside its handler (`run`), with NAME and HELP.

A handler reads its arguments, calls the library function that does the work, and prints the result.
Heavy libraries (torch, transformers) are imported inside `run`, so `steps`, `render` and `filter` start
fast."""

from reference.commands import (
    add_tokens,
    bench,
    continue_training,
    dpo,
    filter,
    generate,
    merge,
    preference,
    quantize,
    recipe,
    render,
    reproduce,
    steps,
    train,
    verify,
)

COMMANDS = (
    steps,
    bench,
    render,
    add_tokens,
    filter,
    train,
    continue_training,
    merge,
    generate,
    preference,
    verify,
    reproduce,
    dpo,
    quantize,
    recipe,
)
