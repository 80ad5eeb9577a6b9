"""chat: one channel of messages with emoji reactions and a topic.

- `history` is a `Vector` (RGA) of messages: concurrent posts all survive, in one order
  on every node (by HLC of the post, ties by member).
- `reactions` maps message id → emoji → `Counter`: concurrent reactions all count.
  `unreact` only undoes a reaction the local replica can see; two members undoing the
  last reaction concurrently can take a counter below zero, which is shown as 0.
- `channel_topic` is a last-writer-wins register.

Events: `MessagePosted`, `ReactionAdded`, `ReactionRemoved`, `TopicChanged`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from trionode.sdk import App, AppError, Counter, LwwRegister, UnorderedMap, Vector

app = App("chat")

MessageText = Annotated[str, msgspec.Meta(min_length=1, max_length=4000)]
Emoji = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
Topic = Annotated[str, msgspec.Meta(max_length=256)]
MAX_PAGE = 1000


class Message(msgspec.Struct, frozen=True):
    id: str
    author: str
    """The author's member key, base58."""
    text: str
    sent_at: float
    """Unix seconds on the author's node."""


class MessagePosted(msgspec.Struct):
    id: str
    author: str
    text: str


class ReactionAdded(msgspec.Struct):
    message_id: str
    emoji: str
    by: str


class ReactionRemoved(msgspec.Struct):
    message_id: str
    emoji: str
    by: str


class TopicChanged(msgspec.Struct):
    topic: str
    by: str


class UnknownMessage(AppError):
    """No message has this id (here, yet)."""

    code = 404


@app.state
class Chat:
    history: Vector[Message]
    reactions: UnorderedMap[str, UnorderedMap[str, Counter]]
    channel_topic: LwwRegister[str]

    @app.init
    def init(self, topic: Topic = "") -> None:
        if topic:
            self.channel_topic.set(topic)

    @app.method
    def post(self, text: MessageText) -> str:
        """Post a message; returns its id."""
        message_id = app.unique_id()
        author = app.executor_base58()
        self.history.append(Message(message_id, author, text, app.now()))
        self.reactions.touch(message_id)  # marks the id as known (see `_require`)
        app.emit(MessagePosted(id=message_id, author=author, text=text))
        return message_id

    @app.method
    def react(self, message_id: str, emoji: Emoji) -> int:
        """Add a reaction; returns the emoji's new count on that message."""
        self._require(message_id)
        count = self.reactions[message_id][emoji]
        count.increment()
        app.emit(ReactionAdded(message_id=message_id, emoji=emoji, by=app.executor_base58()))
        return count.value()

    @app.method
    def unreact(self, message_id: str, emoji: Emoji) -> int:
        """Take back a reaction (if there is one to take back); returns the new count."""
        self._require(message_id)
        count = self.reactions[message_id][emoji]
        if count.value() <= 0:
            return 0
        count.decrement()
        app.emit(ReactionRemoved(message_id=message_id, emoji=emoji, by=app.executor_base58()))
        return max(count.value(), 0)

    @app.method
    def set_topic(self, topic: Topic) -> None:
        self.channel_topic.set(topic)
        app.emit(TopicChanged(topic=topic, by=app.executor_base58()))

    @app.view
    def topic(self) -> str:
        return self.channel_topic.get() or ""

    @app.view
    def messages(
        self,
        offset: Annotated[int, msgspec.Meta(ge=0)] = 0,
        limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)] = 100,
    ) -> list[dict[str, Any]]:
        """Messages in channel order, oldest first, with their reaction counts."""
        page = self.history.to_list()[offset : offset + limit]
        return [
            {
                "id": message.id,
                "author": message.author,
                "text": message.text,
                "sent_at": message.sent_at,
                "reactions": self._counts(message.id),
            }
            for message in page
        ]

    @app.view
    def count(self) -> int:
        """How many messages the channel holds."""
        return len(self.history)

    def _counts(self, message_id: str) -> dict[str, int]:
        counts = {emoji: c.value() for emoji, c in self.reactions[message_id].items()}
        return {emoji: n for emoji, n in sorted(counts.items()) if n > 0}

    def _require(self, message_id: str) -> None:
        if message_id not in self.reactions:
            raise UnknownMessage(f"no message {message_id!r} in this channel", {"id": message_id})
