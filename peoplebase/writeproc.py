"""The writer in its own process, so the merge and the storage engine get a core of their own.

With `--writer process`, the group-commit thread (writer.py) hands each group to a child
process through a pipe instead of calling the store itself. The child owns the store's write
connection and runs `write_group`; the server process keeps HTTP, parsing, validation and
reads. The answer to a request is still sent only after the child reports the commit.

If the child dies, the group it held is answered 503 (not acknowledged) and a new child is
started for the next group. The child ignores SIGINT and SIGTERM: it ends when the server
closes the pipe, after finishing the group in hand, so a Ctrl-C never cuts a commit short.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from .collector import Collector
from .journal import decode_group, encode_group
from .store import is_postgres_url
from .store.base import StoreUnavailable
from .types import Applied, Update
from .writer import prefer_quick_handoffs

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0


def child_main(conn: Connection, db: str, store_kwargs: dict[str, Any]) -> None:
    """The writer process: open the store, then commit every group the server sends.

    A group arrives as bytes (journal.encode_group), which a SQLite store with write-behind
    keeps as the group's journal row as they are. A store that pipelines (SQLite:
    `send_group`) merges the next group while the previous one commits; a second thread
    waits for each commit and answers, in the order the groups came. Every answer goes
    through that thread, so answers never overtake each other. An answer carries what the
    server's readers must see of the group (store/overlay.py).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    prefer_quick_handoffs()  # the store's committer thread hands groups back and forth
    from .store import open_store

    try:
        store = open_store(db, **store_kwargs)
        store.open()
    except Exception as exc:  # reported to the server, which refuses to start
        conn.send(("unavailable", f"{type(exc).__name__}: {exc}"))
        return
    overlay = getattr(store, "overlay", None)
    if overlay is not None:
        overlay.enabled = False  # the server process's readers keep it
    conn.send(("ready", None))
    collector = Collector()
    answers: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
    responder = threading.Thread(
        target=_answer, args=(conn, store, answers), name="peoplebase-answers", daemon=True
    )
    responder.start()
    pipelined = hasattr(store, "send_group")
    # a message read early (with its group decoded), to let the store read its profiles sooner
    ahead: list[tuple[Any, Any]] = []

    def upcoming() -> Any:
        """The next group's requests, if the server has sent them already."""
        if not ahead:
            try:
                if not conn.poll():
                    return None
                message = conn.recv()
            except (EOFError, OSError):
                message = None
            requests = None
            if message is not None and message[0] == "group":
                try:
                    requests = decode_group(message[1])
                except ValueError:
                    requests = None  # answered as an error in its turn
            ahead.append((message, requests))
        return ahead[0][1]

    try:
        while True:
            requests = None
            if ahead:
                message, requests = ahead.pop()
            else:
                try:
                    message = conn.recv()
                except EOFError:
                    break
            if message is None:
                break
            kind, first, second = message
            try:
                if kind == "session":  # a query session's rows, written for the server
                    store._session_write(first, second)  # type: ignore[attr-defined]
                    answers.put(("reply", ("ok", (None, None))))
                    continue
                if kind in ("sync", "idle"):  # write profile rows now, for the server's reads
                    if kind == "sync":
                        delta = store.sync() if hasattr(store, "sync") else None
                    else:
                        delta = store.idle() if hasattr(store, "idle") else None
                    answers.put(("reply", ("ok", (None, delta))))
                    continue
                if requests is None:
                    requests = decode_group(first)
                if pipelined:
                    ticket = store.send_group(requests, second, upcoming, body=first)  # type: ignore[attr-defined]
                    answers.put(("group", ticket))
                else:
                    answers.put(("reply", ("ok", (store.write_group(requests, second), None))))
                collector.after_group()
            except StoreUnavailable as exc:
                answers.put(("reply", ("unavailable", str(exc))))
            except Exception as exc:
                answers.put(("reply", ("error", f"{type(exc).__name__}: {exc}")))
    except (BrokenPipeError, ConnectionResetError, OSError):
        pass  # the server is gone: whatever was committed stays committed
    finally:
        answers.put(None)
        responder.join()
        store.close()


def _answer(
    conn: Connection, store: Any, answers: queue.SimpleQueue[tuple[str, Any] | None]
) -> None:
    """Send each answer once its group has committed, in the order the groups came."""
    broken = False
    while True:
        item = answers.get()
        if item is None:
            return
        kind, value = item
        if kind == "group":
            try:
                value = ("ok", (store.await_group(value), value.delta))
            except StoreUnavailable as exc:
                value = ("unavailable", str(exc))
            except Exception as exc:
                value = ("error", f"{type(exc).__name__}: {exc}")
        if broken:
            continue  # the server is gone; the remaining groups still finish their commits
        try:
            conn.send(value)
        except (BrokenPipeError, ConnectionResetError, OSError):
            broken = True


class ProcessWriteStore:
    """Stands in for the store on the writer thread: `write_group` runs in the child.

    Groups can be pipelined: `send_group` sends a group and returns a ticket, `await_group`
    waits for that group's answer. The child commits groups in the order they were sent and
    answers in that order, so while it commits one group the server can already encode and
    send the next (writer.py runs PIPELINE_DEPTH writer threads for this).
    """

    # Groups in flight: one committing in the child while the next is merged there (and, when
    # it came in time, its profiles were read ahead). Measured side by side with rows written
    # behind (b50, 16 connections, 8 s each, alternating): 2 in flight 14.7-16.4k records/s,
    # 3 in flight 12.3-15.3k, 1 in flight 12.9-14.5k; at b2000, 2 as fast as 3 or faster.
    # With 3, the 16 connections' requests were spread over smaller groups. On a faster day,
    # 2 against 3 (three runs each): b50 33.6-34.1k against 32.8-36.1k, b2000 37.3-40.5k
    # against 38.2-40.0k: the same, with one group less held in memory.
    PIPELINE_DEPTH = 2

    def __init__(self, db: str, **store_kwargs: Any) -> None:
        self.db = db
        self.store_kwargs = store_kwargs
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # sending, starting and stopping the child
        self._replies = threading.Condition()  # reading answers, in ticket order
        self._sent = 0  # tickets handed out
        self._answered = 0  # tickets whose answer (or failure) has been read
        self._broken: Connection | None = None
        self._closed = False
        self.restarts = 0
        # the server process's readers' overlay (SQLite with write-behind), fed by the answers
        self.overlay: Any = None
        self._sqlite = not is_postgres_url(db)

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=child_main,
            args=(child, self.db, self.store_kwargs),
            name="peoplebase-writer",
            daemon=True,
        )
        process.start()
        child.close()
        if not parent.poll(START_TIMEOUT):
            process.kill()
            raise StoreUnavailable("the writer process did not start")
        try:
            status, value = parent.recv()
        except EOFError as exc:
            raise StoreUnavailable("the writer process ended while starting") from exc
        if status != "ready":
            process.join(5)
            raise StoreUnavailable(f"the writer process cannot open the store: {value}")
        self._process, self._conn = process, parent
        log.info("writer process %s started", process.pid)

    def write_group(
        self, requests: Sequence[Sequence[Update]], counts: dict[tuple[str, str], int] | None = None
    ) -> list[Applied]:
        return self.await_group(self.send_group(requests, counts))

    def send_group(
        self, requests: Sequence[Sequence[Update]], counts: dict[tuple[str, str], int] | None = None
    ) -> tuple[int, Connection]:
        """Send one group to the child; the ticket says which answer is its own."""
        return self._send(("group", encode_group(requests), counts))

    def session_write(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Write query-session rows through the child, which holds SQLite's write lock.

        A second writer on the file would wait for the lock while the child commits group
        after group, and could time out under sustained load.
        """
        self.await_group(self._send(("session", sql, list(rows))))

    def sync(self) -> None:
        """Have the child write every changed profile's row now (before a read that scans
        them); returns once the server's overlay knows."""
        self.await_group(self._send(("sync", None, None)))

    def idle(self) -> None:
        """No group is coming: let the child write the rows that are due."""
        if self._sqlite:
            self.await_group(self._send(("idle", None, None)))

    def _send(self, message: tuple[str, Any, Any]) -> tuple[int, Connection]:
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the server is shutting down")
            if self._conn is None or self._conn is self._broken or not self._process.is_alive():
                # the groups sent to the dead child fail on their own (their pipe is gone);
                # a new child starts once their answers are all accounted for
                with self._replies:
                    while self._answered < self._sent:
                        self._replies.wait(1.0)
                self.restarts += 1
                log.error("the writer process is gone; starting a new one")
                self._close_pipe()
                self._start()
            conn = self._conn
            assert conn is not None
            ticket = self._sent
            self._sent += 1
            try:
                conn.send(message)
            except (EOFError, OSError):
                pass  # reported by await_group, in this ticket's turn
            except BaseException:
                # not sent at all (pickling failed before anything was written): give the
                # ticket back, or every later answer would wait for this one
                self._sent -= 1
                raise
            return ticket, conn

    def await_group(self, sent: tuple[int, Connection]) -> list[Applied]:
        """Wait for the answer to one sent group (answers come in the order groups were sent)."""
        ticket, conn = sent
        with self._replies:
            while self._answered != ticket:
                self._replies.wait()
            try:
                status, value = conn.recv()
                if status == "ok" and value[1] is not None and self.overlay is not None:
                    # before the group's requests are answered, and before the next group's
                    # answer is read: the overlay takes the groups' changes in commit order
                    # (applied after the next one, an older state would replace a newer one)
                    self.overlay.apply(value[1])
            except (EOFError, OSError) as exc:
                self._broken = conn  # the next send starts a new child
                raise StoreUnavailable(f"the writer process ended during a commit: {exc}") from exc
            finally:
                self._answered += 1
                self._replies.notify_all()
        if status == "ok":
            results = value[0]
            return list(results) if results is not None else []
        if status == "unavailable":
            raise StoreUnavailable(value)
        raise RuntimeError(f"the writer process failed: {value}")

    def _close_pipe(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                try:
                    self._conn.send(None)
                except OSError:
                    pass
                self._close_pipe()
            if self._process is not None:
                self._process.join(timeout)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join(5)
                self._process = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None
