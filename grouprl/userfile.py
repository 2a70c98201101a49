"""Loading a name from the user's own Python file ('path/to/file.py:name'): a reward function or an
environment class. Importing runs the file's top level, so its failures become one-line UserErrors and
what it may change in the process (signal handlers, grad mode) is put back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from grouprl.errors import UserError


def load_attribute(path: str, attr: str, kind: str, name: str):
    """The attribute `attr` of the file at `path`. kind: 'reward' or 'environment' (for the messages);
    name: what the user wrote."""
    from grouprl.rewards import kept_process_state

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{kind} file {path!r} not found (from {kind} {name!r})")
    spec = importlib.util.spec_from_file_location(f"grouprl_user_{kind}_{file.stem}", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        with kept_process_state():
            spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise  # the user's Ctrl-C
    except SystemExit as e:
        call = "exit()" if e.code is None else f"exit({e.code!r})"
        defines = "functions" if kind == "reward" else "functions and classes"
        raise UserError(f"{kind} file {path!r} called {call} while being imported: a {kind} file must only "
                        f"define {defines}") from None
    except BaseException as e:
        lines = str(e).splitlines()
        raise UserError(f"{kind} file {path!r} failed to import: {type(e).__name__}: "
                        f"{lines[0] if lines else ''}") from None
    return getattr(module, attr, None)
