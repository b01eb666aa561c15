"""Fan-out: subscriber registry, catch-up from the ledger, live streaming with backpressure."""

from fanout._catchup import PAGES_HELD as PAGES_HELD
from fanout._catchup import CatchupLimits as CatchupLimits
from fanout._fanout import LAG_CLOSE_CODE as LAG_CLOSE_CODE
from fanout._fanout import Fanout as Fanout
from fanout._fanout import FanoutStats as FanoutStats
from fanout._fanout import Outbox as Outbox
from fanout._fanout import PageItem as PageItem
from fanout._fanout import ReadPage as ReadPage
from fanout._fanout import Subscription as Subscription
from fanout._fanout import encode_event as encode_event
from fanout._message import BATCH_BYTES as BATCH_BYTES
from fanout._message import Message as Message
from fanout._message import framed_batch as framed_batch
from fanout._message import starts_new_batch as starts_new_batch
from fanout._message import ws_binary_frame as ws_binary_frame
