"""A lying relay: a real WebSocket server that speaks the protocol and serves scripted history.

It accepts any session token and answers subscriptions with whatever events the test hands it
— forged proofs, spliced content, anything a compromised relay could send — with a chain it
computed itself. Its account directory lies as told: `directory` holds the `AccountInfo` it
answers `get_account` with (any keys the test likes), and with `silent_directory` it never
answers a lookup at all; `directory_requests` counts the lookups it was asked. The client kit
on the other end is the real one, so a test shows the alarm a user would get.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import msgspec
import nacl.signing
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from model import wire
from model.envelope import MAX_BODY_BYTES

if TYPE_CHECKING:
    from model.envelope import SignedEvent


class EvilRelay:
    def __init__(
        self,
        collab_id: str,
        events: list[tuple[int, SignedEvent, bytes]],
        *,
        directory: dict[str, wire.AccountInfo] | None = None,
        silent_directory: bool = False,
    ) -> None:
        self.collab_id = collab_id
        self.events = events
        self.key = nacl.signing.SigningKey.generate()
        self.url = ""
        self.directory = directory or {}
        self.silent_directory = silent_directory
        self.directory_requests = 0

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_websocket, self._handle, "127.0.0.1", 0, None)
            )
            self.url = f"ws://127.0.0.1:{server.port}"
            task_status.started(self.url)

    async def _handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        welcome = wire.Welcome(
            protocol=wire.PROTOCOL,
            relay_pk=bytes(self.key.verify_key),
            max_frame_bytes=wire.MAX_FRAME_BYTES,
            max_body_bytes=MAX_BODY_BYTES,
        )
        await ws.send_message(wire.encode(welcome))
        account_id = ""
        try:
            while True:
                req = wire.decode_request(await ws.get_message())  # type: ignore[arg-type]
                match req:
                    case wire.Authenticate():
                        account_id = req.token  # tests pass the account id as the "token"
                        await ws.send_message(
                            wire.encode(wire.Authenticated(rid=req.rid, account_id=account_id))
                        )
                    case wire.Subscribe():
                        await ws.send_message(
                            wire.encode(
                                wire.Subscribed(
                                    rid=req.rid, collab_id=req.collab_id, from_seq=req.from_seq
                                )
                            )
                        )
                        for seq, signed, chain in self.events[req.from_seq - 1 :]:
                            frame = wire.Event(
                                collab_id=self.collab_id, seq=seq, event=signed, chain=chain
                            )
                            await ws.send_message(wire.encode(frame))
                        last = self.events[-1][0] if self.events else 0
                        await ws.send_message(
                            wire.encode(wire.CaughtUp(collab_id=self.collab_id, seq=last))
                        )
                    case wire.GetAccount():
                        self.directory_requests += 1
                        info = self.directory.get(req.account_id or req.handle or "")
                        if self.silent_directory:
                            continue  # never answers: the client must not need it to verify
                        reply: wire.Reply = (
                            wire.Error(
                                rid=req.rid,
                                code=wire.ErrorCode.NOT_FOUND,
                                message="no such account",
                            )
                            if info is None
                            else msgspec.structs.replace(info, rid=req.rid)
                        )
                        await ws.send_message(wire.encode(reply))
                    case wire.Unsubscribe():
                        await ws.send_message(
                            wire.encode(wire.Unsubscribed(rid=req.rid, collab_id=req.collab_id))
                        )
                    case _:
                        await ws.send_message(
                            wire.encode(
                                wire.Error(
                                    rid=getattr(req, "rid", None),
                                    code=wire.ErrorCode.INVALID_REQUEST,
                                    message="not scripted",
                                )
                            )
                        )
        except ConnectionClosed:
            pass
