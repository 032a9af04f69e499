"""Bad inputs: one error type, and the one way the node layer reports it, `Node: input: what was expected`.

Code raises `InputError` (a ValueError) and names the node input when it knows it (`input_name`); the
node layer turns any failure into `NodeInputError` once (`blame`, `node_errors`), so the user always
reads which node, which input, and what was expected. User text quoted in messages is
shortened (`quote`), and whole messages are capped: a 1 MB input never becomes a 1 MB error.
"""
from __future__ import annotations

import difflib
import errno
import functools
from contextlib import contextmanager

QUOTE_LIMIT = 80  # characters of user input quoted in a message
NODE_NAMES: dict[str, str] = {}  # node id -> the name users see (filled by the node layer)
MESSAGE_LIMIT = 1500  # characters of one error message


class InputError(ValueError):
    """A bad input; `input_name` is the node input it came from, when the raiser knows it."""

    def __init__(self, message: str, input_name: str | None = None):
        super().__init__(message)
        self.input_name = input_name


class NodeInputError(InputError):
    """`Node: input: message`, what the user sees."""

    def __init__(self, node: str, input_name: str, message: str):
        self.node, self.detail = node, clip(str(message))
        super().__init__(f"{NODE_NAMES.get(node, node)}: {input_name}: {self.detail}", input_name)


def clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters in all)"


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """repr() of user input, shortened."""
    try:
        text = repr(value)
    except RecursionError:
        return f"<a {type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def did_you_mean(name: str, known) -> str:
    """'; did you mean 'x'?' for names close to `name`, else ''."""
    close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(quote(c) for c in close)}?" if close else ""


def describe(error: BaseException) -> str:
    """Plain words for low-level errors that would otherwise reach the user raw."""
    if isinstance(error, RecursionError):
        return "the data is nested too deeply (a hostile or corrupt file?)"
    if isinstance(error, OverflowError):
        return f"a number is too large ({error})"
    if isinstance(error, ZeroDivisionError):
        return "a value leads to a division by zero (an empty or degenerate input?)"
    if isinstance(error, OSError):
        if error.errno == errno.ENAMETOOLONG:
            return "the file name is too long"
        reason = error.strerror or type(error).__name__
        return f"cannot access the file: {reason}" + (f" ({quote(str(error.filename))})" if error.filename else "")
    if isinstance(error, ValueError) and "null byte" in str(error):
        return "the text contains a NUL character"
    if isinstance(error, MemoryError):
        return "not enough memory for this input"
    return f"{type(error).__name__}: {error}"


# Low-level errors an input can provoke; anything else (interrupts, host errors) passes through untouched.
_MAPPED = (ValueError, ArithmeticError, RecursionError, OSError, UnicodeError, MemoryError, AssertionError)


@contextmanager
def blame(node: str, input_name: str):
    """Report failures inside as `node: <input>: ...`: the input an InputError names, else `input_name`."""
    try:
        yield
    except NodeInputError:
        raise
    except ValueError as error:
        if isinstance(error, InputError):
            raise NodeInputError(node, error.input_name or input_name, str(error)) from None
        plain = str(error) if "null byte" not in str(error) else describe(error)
        raise NodeInputError(node, input_name, plain) from None
    except _MAPPED as error:
        raise NodeInputError(node, input_name, describe(error)) from None


def node_errors(node: str, input_name: str):
    """Decorator for a node's execute: every failure it lets out names the node and an input."""
    def wrap(function):
        @functools.wraps(function)
        def guarded(*args, **kwargs):
            with blame(node, input_name):
                return function(*args, **kwargs)
        return guarded
    return wrap
