from storage import states
from storage.states import Status


def test_every_status_has_a_row_and_targets_are_statuses() -> None:
    assert set(states.TRANSITIONS) == set(Status)
    for targets in states.TRANSITIONS.values():
        assert targets <= set(Status)


def test_posted_is_final_and_every_active_state_can_end() -> None:
    assert states.TRANSITIONS[Status.POSTED] == frozenset()
    for s in states.ACTIVE:
        # from every active state some path leads to a terminal state
        seen, todo = set(), [s]
        while todo:
            cur = todo.pop()
            seen.add(cur)
            todo.extend(t for t in states.TRANSITIONS[cur] if t not in seen)
        assert seen & states.TERMINAL, s


def test_examples() -> None:
    assert states.allowed("held_for_review", "generated")
    assert not states.allowed("posted", "generated")
    assert not states.allowed("queued", "posted")
    assert states.sources_of(Status.RUNNING) == {Status.QUEUED}
