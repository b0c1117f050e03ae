"""Events and a clock for the store tests."""

from gateway.workflows.journal import JournalEvent


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def started(run_id: str, at: float, workflow: str = "w", caller: tuple[str, str] = ("client", "a")) -> JournalEvent:
    data = {"workflow": workflow, "arguments": {}, "caller": {"kind": caller[0], "id": caller[1]}, "plan": "p1"}
    return JournalEvent(run_id, 0, at, "run_started", data=data)


def settled(run_id: str, seq: int, at: float, key: str, status: str = "succeeded") -> JournalEvent:
    return JournalEvent(run_id, seq, at, "step_settled", key, 1, {"step": key, "status": status, "duration_ms": 1.0})


def finished(run_id: str, seq: int, at: float, status: str = "succeeded") -> JournalEvent:
    result = {"content": [{"type": "text", "text": "done"}], "isError": status != "succeeded"}
    return JournalEvent(run_id, seq, at, "run_finished", data={"status": status, "duration_ms": 5.0, "result": result})
