"""Errors the user can fix: the harness prints them as one line, never as a traceback."""


class UserError(Exception):
    """Bad input (config, data path, unreachable hub). The message names the fix."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (whitespace collapsed, cut at ``limit``), or its type's name."""
    text = " ".join(str(error).split())
    if not text:
        return type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def unreachable(what: str, name: str, key: str, copy: str = "/path/to/local/copy") -> str:
    """The message for a hub name that cannot be fetched: which key takes a local copy instead."""
    return (
        f"could not fetch {what} {name!r}: the Hugging Face hub is unreachable (or HF_HUB_OFFLINE=1); "
        f"copy it to this machine and set {key}={copy}"
    )
