"""What every `python -m dpc_jax.<tool>` does with a user's mistake: one `Error: ...` line (and
what to do), exit status 2, no traceback.

User errors are the exceptions dpc_jax raises for inputs that can be wrong: ValueError (config
values, checkpoint and data contents), KeyError (unknown names), and the file-system errors of
paths (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
PermissionError). Anything else is a bug and keeps its traceback. Set DPC_JAX_TRACEBACK=1 to see
the traceback of a user error too.

    run_cli(fn, *args)          -> 0, or 2 after one `Error:` line on a user error (130
                                   after one line on Ctrl-C)
    require_extra(package, what) raises, before any work, the error run_cli reports as
                                   "WHAT needs PACKAGE, which is not installed: pip install ..."
    absl_flags_parser(flag, print_help)
                                -> a `flags_parser` for absl's `app.run`: a misspelt
                                   `--config.field` gives one line with the closest fields;
                                   `-h`/`--help` calls the command's `print_help(argv)`

Nothing here imports the rest of dpc_jax: every layer's command line may use it.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import os
import sys
from typing import Callable, List, Optional

TRACEBACK_ENV = "DPC_JAX_TRACEBACK"
# FloatingPointError: a diverged run (non-finite loss or update); its message names the step,
# the leaves and the last good checkpoint, which is all the user needs.
# ConnectionError: a download (OpenAI's CLIP, the hub) with no network; its message says what
# to pass instead.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               FileExistsError, PermissionError, FloatingPointError, ConnectionError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C ended
# A write that fails for lack of room (a full disk, a quota, a file-size limit) is the user's
# to fix too; other OSErrors may be our bugs.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Optional dependencies (pyproject.toml extras): the package a command may need -> its extra.
OPTIONAL_EXTRAS = {"torch": "torch", "matplotlib": "plot"}


def show_tracebacks() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def message(error: BaseException) -> str:
    """The error's text (a KeyError's own message, not its repr)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


def print_error(text: str) -> int:
    """Print `Error: text` on stderr; returns the exit status of a user error (2)."""
    print(f"Error: {text}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


class MissingExtra(ModuleNotFoundError):
    """An optional dependency `what` needs is not installed (`require_extra`)."""

    def __init__(self, package: str, what: str):
        super().__init__(f"{what} needs {package}", name=package)
        self.what = what


def require_extra(package: str, what: str) -> None:
    """Import `package` (an optional dependency) now, so that a command that will need it
    stops before any work when it is missing: MissingExtra naming `what` needs it."""
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != package:
            raise  # the package is there; something it imports is not
        raise MissingExtra(package, what) from None


def missing_extra(error: BaseException) -> Optional[str]:
    """For an optional dependency that is not installed, what to install (None otherwise)."""
    if not isinstance(error, ModuleNotFoundError):
        return None
    package = (error.name or "").split(".")[0]
    if package not in OPTIONAL_EXTRAS:
        return None
    what = getattr(error, "what", "this command")
    return (f"{what} needs {package}, which is not installed: pip install -e "
            f"\".[{OPTIONAL_EXTRAS[package]}]\" (from the repository folder)")


def run_cli(fn: Callable, *args, **kwargs) -> int:
    """Exit status of `fn(*args, **kwargs)`: 0, or 2 after one `Error:` line on a user error
    (a missing optional dependency included)."""
    try:
        fn(*args, **kwargs)
    except USER_ERRORS as e:
        if show_tracebacks():
            raise
        return print_error(message(e))
    except ModuleNotFoundError as e:
        text = missing_extra(e)
        if text is None or show_tracebacks():
            raise
        return print_error(text)
    except OSError as e:
        room = no_room(e)
        if room is None or show_tracebacks():
            raise
        return print_error(message(room))
    except KeyboardInterrupt:  # Ctrl-C: the user's choice, not a fault; say what stays
        if show_tracebacks():
            raise
        print("interrupted (Ctrl-C): what was saved stays (a training run resumes from its "
              "last checkpoint when the same command runs again)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


def no_room(error: BaseException) -> Optional[OSError]:
    """The OSError of a write that failed for lack of room in `error` or what it happened
    while handling (a log file closed after a checkpoint failed), the one naming a file
    first; None when there is none."""
    found, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_ROOM:
            found.append(error)
        error = error.__cause__ or error.__context__
    named = [e for e in found if e.filename]
    return (named or found or [None])[0]


# ----------------------------------------------------------------------------------------------
# absl / ml_collections command lines (`python -m dpc_jax.train`)
# ----------------------------------------------------------------------------------------------


def _config_overrides(argv: List[str], name: str) -> List[str]:
    """The dotted field paths of `--<name>.<path>[=value]` arguments."""
    out = []
    for arg in argv[1:]:
        if arg.startswith(f"--{name}."):
            out.append(arg[len(name) + 3:].split("=", 1)[0])
    return out


def config_spec(argv: List[str], name: str) -> Optional[str]:
    """The value of `--<name> SPEC` or `--<name>=SPEC` in `argv`, or None."""
    for i, arg in enumerate(argv[1:], 1):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def unknown_field(config, path: str) -> Optional[str]:
    """Why `config.<path>` does not exist (with the closest field names), or None."""
    node, walked = config, "config"
    for part in path.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if not keys:
            return f"--{walked}.{part}: {walked} is a value ({node!r}), not a group of fields"
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
            hint = (f"; did you mean {', '.join(repr(c) for c in close)}?" if close
                    else f"; its fields: {sorted(keys)}")
            return f"--{walked}.{part}: {walked} has no field {part!r}{hint}"
        node, walked = node[part], f"{walked}.{part}"
    return None


def absl_flags_parser(name: str = "config",
                      print_help: Optional[Callable[[List[str]], None]] = None
                      ) -> Callable[[List[str]], List[str]]:
    """A `flags_parser` for `app.run` that reports a bad command line in one line: a missing
    or failing config file, a misspelt `--config.field` (with the closest names), a value of
    the wrong type, an unknown flag. With `print_help`, `-h`/`--help` prints
    `print_help(argv)` and exits 0 (without it, absl's flag list)."""
    from absl import flags

    def parse(argv: List[str]) -> List[str]:
        if print_help is not None and any(a in ("-h", "--help", "--helpshort")
                                          for a in argv[1:]):
            print_help(argv)
            sys.exit(0)
        try:
            rest = flags.FLAGS(argv)
            value = flags.FLAGS[name].value
            if value is not None:
                value.keys()  # a config file that failed to load raises here, not while parsing
            return rest
        except Exception as e:  # absl's own errors, and what the config file itself raises
            if show_tracebacks():
                raise
            sys.exit(print_error(_explain(argv, e, name)))

    return parse


def _explain(argv: List[str], error: BaseException, name: str) -> str:
    spec = config_spec(argv, name)
    if spec is not None:
        path = spec.split(":", 1)[0]
        if not os.path.isfile(path):
            return f"--{name} {spec}: no config file {path!r} (e.g. configs/dpc_coop.py)"
        try:
            from ml_collections.config_flags import config_flags

            config = config_flags.ConfigFileFlagParser(name, lock_config=False).parse(spec)
        except Exception as e:  # what the config file (its get_config(arg)) raised
            raised = _raised_by_config_file(e)
            if not isinstance(raised, USER_ERRORS):  # a bug keeps its traceback, shown once
                raise raised.with_traceback(raised.__traceback__) from None
            return f"--{name} {spec}: {_first_line(raised)}"
        for field in _config_overrides(argv, name):
            problem = unknown_field(config, field)
            if problem:
                return problem
    text = message(error)
    if isinstance(error, AttributeError):  # ml_collections' misspelt field, as a repr
        text = text.strip("'\"").replace("\\n", " ").replace("\\'", "'")
    return text.splitlines()[0] if text else type(error).__name__


def _raised_by_config_file(error: BaseException) -> BaseException:
    """The exception a config file raised. ml_collections re-raises the file's ValueError or
    TypeError with the file's whole traceback as its message ("Error whilst parsing config
    file: ..."); the file's own exception is that one's context."""
    if (str(error).startswith("Error whilst parsing config file")
            and error.__context__ is not None):
        return error.__context__
    return error


def _first_line(error: BaseException) -> str:
    return (message(error).strip().splitlines() or [type(error).__name__])[0]
