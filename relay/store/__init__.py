"""The only package that talks to Redis."""

from relay.errors import Conflict
from relay.store._legacy import *  # noqa: F403  (temporary: split by job next)
from relay.store._legacy import (
    DeadLetter,
    DeliveryStore,
    Entry,
    Page,
    RegistrationStore,
    RoamingStore,
    StateReader,
    StateWrite,
    Store,
    connect,
    id_tuple,
    is_nogroup,
    split_state,
)  # fmt: skip

__all__ = [
    "Conflict", "DeadLetter", "DeliveryStore", "Entry", "Page", "RegistrationStore", "RoamingStore", "StateReader",
    "StateWrite", "Store", "connect", "id_tuple", "is_nogroup", "split_state",
]  # fmt: skip
