"""What minisink's command lines share: arguments checked before any work, and one line per error.

    python run.py, python -m minisink eval, python -m minisink golden, python -m minisink train

Every one of them follows the same contract:

    exit 0    done
    exit 1    a problem with a file, a model or the input: one line on stderr, `PROG: error: ...`
    exit 2    a bad command line (argparse's convention): one line on stderr, no usage block
    exit 130  Ctrl-C, at any moment, the seconds spent importing torch included: `PROG: interrupted`

Arguments are checked as argparse reads them (the `type=` functions below: ranges, devices, files
that must be readable, folders that must be writable), so a wrong flag costs nothing: no model is
loaded, nothing is written. `main()` then turns the library's user-facing exceptions into the one
line; anything else is a bug in minisink and keeps its traceback.

Text is UTF-8. Text that is not is reported, never guessed at: the file (or flag, or stdin line) and
the byte offset of the first invalid byte.
"""
import argparse
import math
import os
import signal
import sys
from pathlib import Path

# Below this many parameters a decode step is a few microseconds of arithmetic per matrix: more
# threads only add the cost of waking and joining them, and on a busy machine they wait for cores
# (issue 17 measured 4 tok/s with torch's default threads against 56 tok/s with one, on the default model).
TINY_MODEL_PARAMS = 10_000_000


class UserError(Exception):
    """Something the user can fix (a file, a flag, the input); printed as one line, exit code 1."""


class UsageError(UserError):
    """A flag whose value the model or the machine cannot take (a cache too large for memory or for
    the model's window), found once the model's config is read: one line, exit code 2, as argparse."""


# ---------------------------------------------------------------------------------- Ctrl-C

def exit_on_interrupt(prog: str) -> None:
    """From now on, Ctrl-C prints `PROG: interrupted` and exits 130 at once, whatever is running.

    Call it first thing in a `__main__`, before `import torch`: a KeyboardInterrupt raised inside an
    import prints a long traceback from deep in torch. `raise_on_interrupt()` gives Python's
    KeyboardInterrupt back once there is something to clean up or to summarise."""
    def handler(signum, frame):
        os.write(2, f"{prog}: interrupted\n".encode())
        os._exit(130)
    signal.signal(signal.SIGINT, handler)


def raise_on_interrupt() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)


class DeferredInterrupt:
    """`with DeferredInterrupt() as ctrl_c:` Ctrl-C sets `ctrl_c.pressed` instead of raising, so a
    loop can stop between two tokens rather than in the middle of a cache update."""

    def __init__(self):
        self.pressed = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._press)
        return self

    def _press(self, signum, frame):
        self.pressed = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


# ------------------------------------------------------------------------------- the parser

class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`PROG: error: ...`), exit 2, without the usage block."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def main(prog: str, run, argv=None, errors: tuple = (), error_code: int = 1) -> int:
    """run(argv) -> exit code, with every user-facing failure as one line on stderr.

    `errors`: the caller's own exception classes that are the user's to fix (exit 1), beside the
    library's. OSError and UnicodeError are files the user named: unreadable, unwritable, not text.
    `error_code`: 1, or 2 where exit 1 already means something else (a failed golden check)."""
    from ..weights.hub import HubError, one_line
    from ..weights.load import LoadError
    raise_on_interrupt()  # imports are done: from here on, Ctrl-C unwinds and files are closed
    try:
        return run(argv)
    except BrokenPipeError:  # `... | head`: the reader has gone, so have we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UsageError as e:
        sys.stderr.write(f"{prog}: error: {one_line(e)}\n")
        return 2
    except (UserError, LoadError, HubError, OSError, UnicodeError, *errors) as e:
        sys.stderr.write(f"{prog}: error: {one_line(e)}\n")
        return error_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


# ------------------------------------------------------------------------- argument types

def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(low: int):
    """type= for an integer >= low."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def int_between(low: int, high: int, why: str = ""):
    """type= for an integer in low..high; `why` says where the upper bound comes from."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be >= {low} and <= {high:,}{why}, got {value}")
        return value
    parse.__name__ = f"integer in {low}..{high}"
    return parse


def float_between(low: float, high: float, why: str = ""):
    """type= for a finite number with low < value <= high; `why` says where the bounds come from."""
    def parse(text: str) -> float:
        value = _number(float, text)
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"must be > {low:g} and <= {high:g}{why}, got {text}")
        return value
    parse.__name__ = f"number in ({low:g}, {high:g}]"
    return parse


def int_list(each):
    """type= for comma-separated integers, each checked by the type= function `each`."""
    def parse(text: str) -> list[int]:
        values = [each(x.strip()) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return values
    parse.__name__ = "comma-separated integers"
    return parse


# What the benchmarks take (they time random models of fixed shapes, so the bounds are fixed too):
# a cache of up to 64K slots (2^16; the 134M Llama shape needs 4.8 GB of fp32 K and V there), and
# up to 10^6 timed steps (hours at the slowest).
BENCH_SLOTS, BENCH_STEPS = 65_536, 1_000_000


def bench_slots(low: int):
    return int_between(low, BENCH_SLOTS, " (cache slots a benchmark allocates)")


def bench_steps(low: int):
    return int_between(low, BENCH_STEPS, " (timed steps)")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Threads beyond the CPUs only wait for each other, and far beyond them torch's thread pool dies
# (SIGSEGV at 99,999, an overflow at 10^12: issue 26): refused, not clamped, so that a number the
# user asked for is never silently another.
THREADS_HELP = "refused above the CPUs this process may use"


def threads(text: str) -> int:
    """type= for --threads: 1 .. usable_cpus()."""
    return int_between(1, usable_cpus(), " (the CPUs this process may use)")(text)


# torch.manual_seed takes a 64-bit seed: larger ones overflow inside torch
SEED_MAX = 2**64 - 1


def seed(text: str) -> int:
    """type= for --seed: 0 .. 2^64-1, what torch.manual_seed takes."""
    return int_between(0, SEED_MAX, " (a 64-bit seed)")(text)


def temperature(text: str) -> float:
    """0 is greedy; a negative temperature has no meaning (it would sample the least likely token)."""
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 is greedy), got {value:g}")
    return value


def top_p(text: str) -> float:
    """Nucleus sampling keeps the most likely tokens whose mass reaches p: 0 < p <= 1 (1 is off)."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 1 (1 keeps every token), got {value:g}")
    return value


def device(text: str) -> str:
    """A device this torch can run on: cpu, cuda[:N] with a CUDA GPU there, mps on Apple silicon
    (and `auto`). Checked when the flag is read, so a wrong one costs no download or load."""
    import torch
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this PyTorch sees no CUDA GPU (torch {torch.__version__}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this PyTorch has no MPS (Apple GPU) backend here; use cpu")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: minisink runs on cpu, cuda or mps, not {dev.type}")
    return text


# The two below are type= functions too, but a path that does not work is a problem with a file,
# not with the command line's grammar: they raise UserError (exit 1), which argparse lets through.

def readable_file(text: str) -> Path:
    """A file that exists and can be read."""
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"{text}: no such file")
    if not path.is_file():
        raise UserError(f"{text}: not a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{text}: not readable (permission denied)")
    return path


def writable_folder(text: str) -> Path:
    """A folder to write into: one that can be written, or one that can be created (its nearest
    existing parent is a folder that can be written). Nothing is created here."""
    path = Path(text).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise UserError(f"{text}: exists and is not a folder")
    if not existing.is_dir():
        raise UserError(f"{text}: cannot be created, {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{text}: cannot write in {existing} (permission denied)")
    return path


def text_arg(text: str) -> str:
    """Text from the command line, which must be UTF-8. Python hands undecodable argv bytes over as
    lone surrogates; they are reported here, not passed on to crash the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        data = os.fsencode(text)  # the bytes as they were typed
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid UTF-8: {bad_byte(data, e)}") from None
    return text


# ------------------------------------------------------------------------------------- text

def decode_utf8(data: bytes, where: str) -> str:
    """bytes -> str, or a UserError naming `where`, the line and the byte offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not valid UTF-8: {bad_byte(data, e)}; minisink reads UTF-8 text only") from None


def bad_byte(data: bytes, e: UnicodeDecodeError) -> str:
    """Where decoding `data` failed: the byte, its offset, and its line if `data` has several."""
    where, newline = f"byte 0x{data[e.start]:02x} at offset {e.start}", b"\n"
    if data.count(newline, 0, len(data) - 1):
        where += f" (line {data.count(newline, 0, e.start) + 1})"
    return where


def read_text(path, where: str | None = None) -> str:
    """A UTF-8 text file, or a UserError that says which file, and where it stops being UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{where or path}: cannot read ({e.strerror or e})") from None
    return decode_utf8(data, where or str(path))


# ------------------------------------------------------------------------------------ threads

def default_threads(model) -> int:
    """CPU threads for decoding `model`: one for a tiny model (under TINY_MODEL_PARAMS), where
    threads only spin; torch's own choice (one per physical core) for anything larger."""
    import torch
    n_params = sum(p.numel() for p in model.parameters())
    return 1 if n_params < TINY_MODEL_PARAMS else torch.get_num_threads()


def refuse_fp16_on_cpu(dtype, device) -> None:
    """The one fp16 refusal (run.py, eval): most CPUs emulate fp16 arithmetic, slowly."""
    import torch
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise UserError("--dtype fp16 is refused on CPU (most CPUs emulate fp16, slowly): use fp32, or bf16 to halve memory")


def resident_bytes() -> tuple[int, bool]:
    """(bytes, now): the process's resident memory now, from /proc (Linux); where there is no /proc,
    the peak so far (now False)."""
    try:
        with open("/proc/self/statm") as f:  # resident pages now
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), True
    except OSError:  # macOS and others: only the peak is known
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak * (1 if sys.platform == "darwin" else 1024), False
