"""Errors a user can act on. The CLI prints them as one line and exits 2."""


class TpfedError(Exception):
    """Base class of every user-facing tpfed error."""


class ModelError(TpfedError):
    """A model or tokenizer file is missing, truncated or of an unsupported kind."""


class PlanError(TpfedError):
    """No plan satisfies the fleet's memory or the model's structure."""


class PeerError(TpfedError):
    """A peer refused, failed or stopped answering; the message names it."""


class FleetError(TpfedError):
    """A fleet description (YAML) or a board profile is invalid."""


class PeerTimeout(PeerError):
    """A peer did not answer within its deadline (as opposed to answering with an error)."""


class PeerLost(PeerError):
    """A peer is gone mid-run: silent past its deadline, its link closed, or it lost its share
    (reset or restarted). ``peer`` is the coordinator's record of it."""

    def __init__(self, message: str, peer: object, waited_s: float = 0.0) -> None:
        super().__init__(message)
        self.peer = peer
        self.waited_s = waited_s  # how long it was waited for before being declared lost


class PeerRefused(PeerError):
    """A peer answered with an ERROR frame; ``code`` is its protocol error code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
