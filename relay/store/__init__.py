"""The only package that talks to Redis (and the only code that imports redis-py or hiredis).

One module per job; every public coroutine raises relay.errors' store family only (StoreUnavailable,
NoGroup, Conflict), never a redis-py exception. See docs/architecture.md.
"""

from relay.errors import Conflict, NoGroup, StoreError, StoreUnavailable
from relay.store import keys
from relay.store.append import StateWrite, Store
from relay.store.connection import connect, is_nogroup
from relay.store.deadletters import DeadLetters, Requeue
from relay.store.delivery import DeliveryStore
from relay.store.entries import DeadLetter, Entry, id_tuple
from relay.store.leases import Leases
from relay.store.registration import RegistrationStore
from relay.store.retention import RetentionStore
from relay.store.roaming import RoamingStore
from relay.store.state import Page, StateReader, split_state

__all__ = [
    "Conflict", "DeadLetter", "DeadLetters", "DeliveryStore", "Entry", "Leases", "NoGroup", "Page",
    "RegistrationStore", "Requeue", "RetentionStore", "RoamingStore", "StateReader", "StateWrite", "Store",
    "StoreError", "StoreUnavailable",
    "connect", "id_tuple", "is_nogroup", "keys", "split_state",
]  # fmt: skip
