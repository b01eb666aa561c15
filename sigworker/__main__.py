"""`python -m sigworker`: one signature-check worker (see the package docstring)."""

import signal
import sys

from sigworker import serve

# Ctrl-C in a terminal reaches the whole process group: the parent stops its workers itself
# (end of input) once it has drained, so a worker must not die first and print a trace.
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.exit(serve(sys.stdin.buffer, sys.stdout.buffer))
