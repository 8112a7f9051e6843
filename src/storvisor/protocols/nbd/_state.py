"""The server side's state machine: every legal transition, in one table.

::

    AWAIT_CLIENT_FLAGS --client flags--> OPTIONS
    OPTIONS --option the codec answers--> OPTIONS
    OPTIONS --LIST / INFO / GO / EXPORT_NAME--> AWAIT_ANSWER
    AWAIT_ANSWER --answered (list, info, error)--> OPTIONS
    AWAIT_ANSWER --export accepted for GO / EXPORT_NAME--> TRANSMISSION
    AWAIT_ANSWER --EXPORT_NAME refused--> CLOSED
    OPTIONS --ABORT--> CLOSED
    OPTIONS --STARTTLS accepted--> AWAIT_TLS
    AWAIT_TLS --TLS handshake done--> OPTIONS
    TRANSMISSION --command--> TRANSMISSION
    TRANSMISSION --DISC--> CLOSED
    any --end of file or protocol error--> CLOSED
"""

from __future__ import annotations

from enum import Enum, auto

from storvisor.errors import StateError


class State(Enum):
    AWAIT_CLIENT_FLAGS = auto()
    OPTIONS = auto()
    AWAIT_ANSWER = auto()
    AWAIT_TLS = auto()
    TRANSMISSION = auto()
    CLOSED = auto()


class Trigger(Enum):
    CLIENT_FLAGS = auto()
    OPTION_ANSWERED_BY_CODEC = auto()
    OPTION_FOR_SERVER = auto()
    ANSWERED = auto()
    EXPORT_ACCEPTED = auto()
    EXPORT_NAME_REFUSED = auto()
    ABORT = auto()
    STARTTLS = auto()
    TLS_STARTED = auto()
    COMMAND = auto()
    DISC = auto()
    END = auto()


TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (State.AWAIT_CLIENT_FLAGS, Trigger.CLIENT_FLAGS): State.OPTIONS,
    (State.OPTIONS, Trigger.OPTION_ANSWERED_BY_CODEC): State.OPTIONS,
    (State.OPTIONS, Trigger.OPTION_FOR_SERVER): State.AWAIT_ANSWER,
    (State.AWAIT_ANSWER, Trigger.ANSWERED): State.OPTIONS,
    (State.AWAIT_ANSWER, Trigger.EXPORT_ACCEPTED): State.TRANSMISSION,
    (State.AWAIT_ANSWER, Trigger.EXPORT_NAME_REFUSED): State.CLOSED,
    (State.OPTIONS, Trigger.ABORT): State.CLOSED,
    (State.OPTIONS, Trigger.STARTTLS): State.AWAIT_TLS,
    (State.AWAIT_TLS, Trigger.TLS_STARTED): State.OPTIONS,
    (State.TRANSMISSION, Trigger.COMMAND): State.TRANSMISSION,
    (State.TRANSMISSION, Trigger.DISC): State.CLOSED,
}
for _state in State:
    TRANSITIONS[(_state, Trigger.END)] = State.CLOSED


def transition(state: State, trigger: Trigger) -> State:
    """The state after ``trigger`` in ``state``.

    Raises:
        StateError: the transition is not in the table (the caller used the API out of order).
    """
    try:
        return TRANSITIONS[(state, trigger)]
    except KeyError:
        raise StateError(f"NBD connection: {trigger.name} is not allowed in {state.name}") from None
