"""libevent's evconnlistener, carried into Trio's structured concurrency."""

from ._activation import activation_sockets as activation_sockets
from ._errors import BACKOFF_MAX as BACKOFF_MAX
from ._errors import BACKOFF_MIN as BACKOFF_MIN
from ._errors import ERROR_LOG_INTERVAL as ERROR_LOG_INTERVAL
from ._errors import ResourceLimitWarning as ResourceLimitWarning
from ._fd_budget import FD_RESERVE as FD_RESERVE
from ._flags import LEV_OPT_BIND_IPV6ONLY as LEV_OPT_BIND_IPV6ONLY
from ._flags import LEV_OPT_CLOSE_ON_EXEC as LEV_OPT_CLOSE_ON_EXEC
from ._flags import LEV_OPT_CLOSE_ON_FREE as LEV_OPT_CLOSE_ON_FREE
from ._flags import LEV_OPT_DEFERRED_ACCEPT as LEV_OPT_DEFERRED_ACCEPT
from ._flags import LEV_OPT_DISABLED as LEV_OPT_DISABLED
from ._flags import LEV_OPT_LEAVE_SOCKETS_BLOCKING as LEV_OPT_LEAVE_SOCKETS_BLOCKING
from ._flags import LEV_OPT_REUSEABLE as LEV_OPT_REUSEABLE
from ._flags import LEV_OPT_REUSEABLE_PORT as LEV_OPT_REUSEABLE_PORT
from ._flags import LEV_OPT_THREADSAFE as LEV_OPT_THREADSAFE
from ._flags import Flag as Flag
from ._handoff import hand_off as hand_off
from ._handoff import notify_ready as notify_ready
from ._listener import ConnListener as ConnListener
from ._open import open_listener as open_listener
from ._open import serve_listener as serve_listener
from ._options import ListenerOptions as ListenerOptions
from ._stats import DrainResult as DrainResult
from ._stats import ListenerStatistics as ListenerStatistics
from ._stream import SocketStream as SocketStream
from ._transport import Transport as Transport
from ._version import __version__ as __version__

__all__ = [
    "BACKOFF_MAX",
    "BACKOFF_MIN",
    "ERROR_LOG_INTERVAL",
    "FD_RESERVE",
    "LEV_OPT_BIND_IPV6ONLY",
    "LEV_OPT_CLOSE_ON_EXEC",
    "LEV_OPT_CLOSE_ON_FREE",
    "LEV_OPT_DEFERRED_ACCEPT",
    "LEV_OPT_DISABLED",
    "LEV_OPT_LEAVE_SOCKETS_BLOCKING",
    "LEV_OPT_REUSEABLE",
    "LEV_OPT_REUSEABLE_PORT",
    "LEV_OPT_THREADSAFE",
    "ConnListener",
    "DrainResult",
    "Flag",
    "ListenerOptions",
    "ListenerStatistics",
    "ResourceLimitWarning",
    "SocketStream",
    "Transport",
    "__version__",
    "activation_sockets",
    "hand_off",
    "notify_ready",
    "open_listener",
    "serve_listener",
]

# Show users and docs the public home of each name, as trio does.
for _obj in (
    ConnListener,
    DrainResult,
    Flag,
    ListenerOptions,
    ListenerStatistics,
    ResourceLimitWarning,
    SocketStream,
    Transport,
    activation_sockets,
    hand_off,
    notify_ready,
    open_listener,
    serve_listener,
):
    _obj.__module__ = __name__
del _obj
