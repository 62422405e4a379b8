"""Messages the console passes around."""
from __future__ import annotations

from textual.message import Message

from .client import ClientEvent


class ClientUpdate(Message):
    """Something changed in the client's mirror (posted to the app by the client listener).

    Consecutive updates of the same job collapse into one: the mirror already holds
    the latest state, so only the fact that the job changed matters.
    """

    def __init__(self, event: ClientEvent) -> None:
        super().__init__()
        self.event = event

    def can_replace(self, message: Message) -> bool:
        return (isinstance(message, ClientUpdate) and message.event.type == "job"
                and self.event.type == "job" and message.event.job_id == self.event.job_id)
