"""The filter over a JSONL file on every core: the machinery around reference/records/filters.py's stages.

`filter_file` cuts the file at line ends into runs, one per core. A forked worker process parses its own
run of the memory-mapped file into a shard (numbering its lines itself, so that the parent reads
nothing) and takes it through the stages as the parent asks (`filters.filter_stages`): between the passes
only per-character counts travel. Each shard then encodes its rows and writes them with `pwrite` at its
own offset of the output files, so they come out in input order and no records cross a pipe. The files
are written under new hidden names beside their targets and renamed into place once all are whole
(`StagedFiles`, X6): a failed or interrupted run (a full disk, SIGTERM, Ctrl-C) removes them and leaves every
target as it was. A worker ends with its parent (`die_with_parent`): killing the command kills its workers.

Not handled: start methods other than fork (a spawned worker would need its shard pickled); a small
input (under 1 MiB), one core or no fork runs the same stages in this process.
"""

from __future__ import annotations

import json
import os
import signal
import traceback
from itertools import accumulate
from typing import NamedTuple

from reference.errors import InputError
from reference.records.data import Pair, Unreadable, parse_jsonl
from reference.records.filters import FilterConfig, FilterResult, LocalShards, Reject, Shard, filter_stages
from reference.staged import HELD, StagedFiles, held_signals, write_at

# json.dumps(value, ensure_ascii=False) builds an encoder per call; one shared encoder writes the same
# text, and for a string it is json's C encode_basestring, which the row writers below call directly.
_encode_value = json.JSONEncoder(ensure_ascii=False).encode
_quote = json.encoder.encode_basestring


def _fields(pair: Pair) -> str:
    head = "" if pair.id is None else f'"id": {_encode_value(pair.id)}, '
    return f'{head}"instruction": {_quote(pair.instruction)}, "response": {_quote(pair.response)}}}\n'


def output_line(pair: Pair) -> str:
    """json.dumps(filters.output_row(pair), ensure_ascii=False) + newline (the seed's output line),
    without building the dict."""
    return "{" + _fields(pair)


def reject_line(reject: Reject) -> str:
    """json.dumps(reject.to_row(), ensure_ascii=False) + newline, without building the dict."""
    head = f'{{"line": {reject.line}, "rule": "{reject.rule}", "detail": {_encode_value(reject.detail)}, '
    if isinstance(reject.record, Unreadable):
        return head + f'"text": {_quote(reject.record.text)}}}\n'
    return head + _fields(reject.record)


class ByteSizes(NamedTuple):
    """How many bytes a shard's rows take in each output file."""

    output: int
    rejects: int


class FileShard(Shard):
    """A shard that writes its own rows into the output files, at the offsets it is given."""

    def first_unreadable(self) -> tuple[int, str] | None:
        return next(((r.line, r.detail) for r in self.rejects if r.rule == "unreadable"), None)

    def encode(self) -> ByteSizes:
        """Encode the kept rows and the rejects (JSONL, UTF-8, unescaped) and return their sizes, so that
        every shard can learn where its bytes begin."""
        self.output_bytes = "".join(map(output_line, self.kept)).encode()
        self.rejects_bytes = "".join(map(reject_line, self.rejects)).encode()
        return ByteSizes(len(self.output_bytes), len(self.rejects_bytes))

    def write_at(self, output: str, output_offset: int, rejects: str, rejects_offset: int) -> None:
        write_at(output, output_offset, self.output_bytes)
        write_at(rejects, rejects_offset, self.rejects_bytes)
        del self.output_bytes, self.rejects_bytes


def starts(sizes: list[int]) -> list[int]:
    """Where each piece begins when pieces of these sizes are laid end to end."""
    return [0, *accumulate(sizes)][:-1]


M_TOP_PAD = -2  # glibc mallopt parameter (malloc.h)


def keep_freed_memory(pad: int = 256 << 20) -> bool:
    """Ask glibc to keep up to `pad` bytes of freed heap instead of handing it back to the kernel at
    once (True when set; False where malloc is not glibc's). For the `filter` command, not for a library.

    The filter allocates and frees many large buffers (record strings, code-point arrays); with the
    default padding each is returned to the kernel and faulted in afresh when the memory is used again.
    On the 69 MB benchmark corpus this took the process from about 1.62 s to 1.51 s (system time
    0.5 s to 0.33 s) on 2 cores. The output does not change."""
    import ctypes

    try:
        return bool(ctypes.CDLL(None).mallopt(M_TOP_PAD, pad))
    except (OSError, AttributeError):
        return False


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def split_lines(data, parts: int) -> list[tuple[int, int]]:
    """Cut the file's bytes (bytes or an mmap) at line ends into at most `parts` runs: (start, end)."""
    cuts = [0]
    for i in range(1, parts):
        at = data.find(b"\n", max(cuts[-1], len(data) * i // parts))
        cuts.append(len(data) if at == -1 else at + 1)
    cuts.append(len(data))
    return [(start, end) for start, end in zip(cuts[:-1], cuts[1:], strict=True) if end > start]


def lines_before(data, end: int, block: int = 1 << 23) -> int:
    """Newlines in data[:end], read a block at a time (data may be an mmap, which has no count)."""
    return sum(data[at : min(at + block, end)].count(b"\n") for at in range(0, end, block))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """In a forked worker: have the kernel SIGKILL this process when its parent ends, however it ends
    (prctl PR_SET_PDEATHSIG, Linux), and end now if the parent `parent` has already gone (between the fork
    and the prctl). Elsewhere a worker still ends when its pipe reports the parent gone (EOF)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _serve(connection, data, start: int, end: int, parent: int = 0, inherited=()) -> None:
    """A worker process: read and parse its run of lines into a shard, then do what the parent asks,
    stage by stage, until it says stop. It ends with the parent; Ctrl-C is the parent's to handle (the
    terminal sends SIGINT to every process of the command: the parent stops the workers)."""
    import gc

    if parent:
        die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C pending since the fork is dropped here
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited through fork
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
    for end_of_parent in inherited:  # the parent's ends of the pipes: held here, they would hide its death
        end_of_parent.close()
    gc.disable()  # records and their strings hold no cycles: the collector's passes over them are wasted
    try:
        shard = FileShard(parse_jsonl(data, 1 + lines_before(data, start), start, end))
        del data
        while True:
            stage, args = connection.recv()
            if stage == "stop":
                return
            if stage == "screen":
                result = shard.screen(*args, progress=lambda n: connection.send(("progress", n)))
            else:
                result = getattr(shard, stage)(*args)
            connection.send(("done", result))
    except (EOFError, BrokenPipeError):
        return  # the parent has gone: nobody to answer
    except (OSError, InputError) as error:  # a full disk, a bad row: the parent raises the same error
        _report(connection, ("failed", error))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        _report(connection, ("error", traceback.format_exc()))


def _report(connection, message) -> None:
    try:
        connection.send(message)
    except OSError:  # the parent has gone
        pass


class Workers:
    """One forked process per run of the input; `ask` sends every shard a stage and gathers the answers."""

    def __init__(self, data, runs, progress=None):
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.progress = progress
        self.connections, self.processes = [], []
        try:
            for start, end in runs:
                parent, child = context.Pipe()
                inherited = (*self.connections, parent)
                process = context.Process(
                    target=_serve, args=(child, data, start, end, os.getpid(), inherited), daemon=True
                )
                self.connections.append(parent)
                with held_signals():  # the worker unblocks them once it has its own handlers (_serve)
                    process.start()
                self.processes.append(process)
                child.close()
        except BaseException:
            self.abort()
            raise

    def ask(self, stage: str, args_per_shard) -> list:
        for connection, args in zip(self.connections, args_per_shard, strict=True):
            connection.send((stage, args))
        answers = []
        for connection, process in zip(self.connections, self.processes, strict=True):
            while True:
                try:
                    kind, value = connection.recv()
                except EOFError:
                    process.join(timeout=5)
                    code = process.exitcode
                    raise RuntimeError(f"a filter worker ended without answering (exit code {code})") from None
                if kind == "progress":
                    if self.progress:
                        self.progress(value)
                    continue
                if kind == "failed":
                    raise value
                if kind == "error":
                    raise RuntimeError(f"a filter worker failed:\n{value}")
                answers.append(value)
                break
        return answers

    def close(self) -> None:
        for connection in self.connections:
            try:
                connection.send(("stop", ()))
            except (BrokenPipeError, OSError):
                pass
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()

    def abort(self) -> None:
        """Stop every worker now, wherever it is (after an error or a signal in the parent)."""
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join()
        for connection in self.connections:
            connection.close()


def filter_file(
    source: str,
    output: str,
    rejects: str,
    config: FilterConfig,
    workers: int | None = None,
    strict: bool = False,
    progress=None,
    staged: StagedFiles | None = None,
) -> FilterResult:
    """The filter over a JSONL file, written to `output` and `rejects`, on up to `workers` processes.

    The two files appear under their names only when whole (X6): written into `staged`'s temporary files
    when it is given (its owner renames them into place with its other files once all are written), else
    into this call's own, renamed before it returns. On any error every worker is stopped at once."""
    if staged is None:
        with StagedFiles({"output": output, "rejects": rejects}) as own:
            return filter_file(source, output, rejects, config, workers, strict, progress, staged=own)
    import mmap
    import multiprocessing

    try:
        file = open(source, "rb")
    except OSError as error:
        raise InputError(f"{source}: cannot open: {error.strerror}") from None
    with file:
        size = os.fstat(file.fileno()).st_size
        workers = workers or default_workers()
        if workers <= 1 or size < (1 << 20) or "fork" not in multiprocessing.get_all_start_methods():
            shards = 1
            pool = LocalShards([FileShard(parse_jsonl(file.read(), 1))], progress)
        else:
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS here: no idle BLAS threads per process
            import numpy  # noqa: F401 - imported once here, inherited by the forked workers
            import pycld2  # noqa: F401

            # The workers read their own runs of the mapped file; the parent reads only near the cuts.
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                runs = split_lines(data, workers)
                shards = len(runs)
                pool = Workers(data, runs, progress)
    try:
        if strict:
            unreadable = min(filter(None, pool.ask("first_unreadable", [()] * shards)), default=None)
            if unreadable is not None:
                line, reason = unreadable
                raise InputError(f"{source}, line {line}: {reason}")
        result = filter_stages(pool, shards, config)
        shard_sizes = pool.ask("encode", [()] * shards)
        # Every shard writes its bytes at its offsets, in input order, into the staged files.
        output_at = starts([sizes.output for sizes in shard_sizes])
        rejects_at = starts([sizes.rejects for sizes in shard_sizes])
        into = (staged.path(output), staged.path(rejects))
        pool.ask("write_at", [(into[0], o, into[1], r) for o, r in zip(output_at, rejects_at, strict=True)])
    except BaseException:
        pool.abort()
        raise
    pool.close()
    return result
