"""ipyparallel's controller, as ``python -m ipyparallel.controller ARGS`` runs it, less the
interpreter's finalization once it has stopped: atexit handlers run (logging's), output is
flushed, then the process ends (a stopped controller has closed its sockets and removed its
files; the rest is tens of ms of freeing what the OS frees anyway)."""

import atexit
import os
import sys

from ipyparallel.controller.app import main

try:
    main()
    code = 0
except SystemExit as stop:  # as the interpreter reads it: None is 0, a message is printed and is 1
    if stop.code is None or isinstance(stop.code, int):
        code = stop.code or 0
    else:
        print(stop.code, file=sys.stderr)
        code = 1
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
