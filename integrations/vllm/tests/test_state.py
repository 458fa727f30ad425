"""The per-request state machine on its own: every allowed transition, the refusal of the others,
and what a restart (recompute after preemption) resets. The engine tests (test_reliability.py)
drive the same machine through vLLM and check the paths requests took."""

import pytest

from kvsieve_vllm.state import ALLOWED, IllegalTransition, Record, State


def test_every_allowed_transition_is_taken_and_every_other_refused():
    for src, targets in ALLOWED.items():
        for dst in State:
            rec = Record("r", state=src)
            if dst in targets:
                rec.go(dst)
                assert rec.state == dst
            else:
                with pytest.raises(IllegalTransition, match=f"{src.value} -> {dst.value}"):
                    rec.go(dst)
                assert rec.state == src, "a refused transition leaves the state alone"


def test_terminal_states_have_no_way_out_and_live_states_can_always_end():
    assert ALLOWED[State.FINISHED] == set() and ALLOWED[State.ABORTED] == set()
    for src in State:
        if src not in (State.FINISHED, State.ABORTED):
            assert {State.FINISHED, State.ABORTED} <= ALLOWED[src], src
    # A request is only resumed from a preemption (or back from a chunk event of its recompute),
    # and only recomputes after one.
    assert [s for s in State if State.RESUMED in ALLOWED[s] and s != State.RESUMED] == [State.PENDING,
                                                                                     State.PREEMPTED]
    assert ALLOWED[State.PREEMPTED] == {State.RESUMED, State.FINISHED, State.ABORTED}


def test_a_full_life_with_preemption_and_recompute():
    rec = Record("r")
    path = [State.PREFILLING, State.PREFILLING, State.PENDING, State.COMPRESSED, State.PENDING, State.COMPRESSED,
            State.PREEMPTED, State.RESUMED, State.RESUMED, State.PENDING, State.COMPRESSED, State.FINISHED]
    rec.offset, rec.protected, rec.frozen, rec.at_len, rec.first_computed = 96, 32, True, 400, 0
    for s in path:
        if s == State.RESUMED and rec.state == State.PREEMPTED:
            rec.restart()
            assert (rec.offset, rec.protected, rec.frozen, rec.at_len, rec.first_computed) == (0, 0, False, 0, None)
        rec.go(s)
    # Chunks repeat in the history; the other states appear once per visit.
    assert rec.history == [State.ADMITTED] + path
    assert rec.prefilling is False


def test_disabled_survives_a_restart():
    rec = Record("r", state=State.TORN, disabled="torn event")
    rec.go(State.PREEMPTED)
    rec.restart()
    rec.go(State.RESUMED)
    assert rec.disabled == "torn event" and rec.prefilling


def test_chunk_events_return_to_prefilling_and_the_prefill_ends_compressed():
    """[prefill]: a chunk event is PENDING between two prefill chunks; whatever its ack, the
    request goes back to where it was (settle), and a recompute's chunk events back to RESUMED."""
    rec = Record("r")
    rec.go(State.PREFILLING)
    for done in (True, False):
        rec.chunk_from = rec.state
        rec.go(State.PENDING)
        rec.events += done
        rec.settle()
        assert rec.state == State.PREFILLING and rec.chunk_from is None
    rec.go(State.COMPRESSED)  # the prompt ended compressed, no prefill-end event due
    rec.go(State.PREEMPTED)
    rec.go(State.RESUMED)
    rec.restart()
    rec.chunk_from = rec.state
    rec.go(State.PENDING)
    rec.settle()
    assert rec.state == State.RESUMED
    rec.go(State.PENDING)  # the prefill-end event: settles as any other
    rec.settle()
    assert rec.state == State.COMPRESSED
