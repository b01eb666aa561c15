"""A small HTTP/1.1 server of our own, shared by the relay's ops listener and `cozy witness`.

h11 (the sans-I/O HTTP/1.1 state machine that wsproto already depends on) parses and frames,
Trio moves the bytes, and a handler (`async (Request) -> Answer`) decides. It imports nothing
of ours, so both the relay and the witness (which trusts nothing of the relay's) may use it.
"""

from httpserve._server import Answer as Answer
from httpserve._server import Handler as Handler
from httpserve._server import HttpServer as HttpServer
from httpserve._server import Limits as Limits
from httpserve._server import Request as Request
from httpserve._server import url_of as url_of
