import pytest

from hera_core.routing.budget import Budget
from hera_core.routing.ledger import Ledger
from tests.test_ledger import row


def test_session_and_daily_caps():
    b = Budget(per_session_usd=0.01, per_day_usd=0.015)
    assert b.exceeded("a") is None
    b.add("a", 0.01)
    assert b.exceeded("a") == "session" and b.exceeded("b") is None
    b.add("b", 0.005)
    assert b.exceeded("b") == "daily"  # the day's cap covers every session


def test_spend_is_seeded_from_the_ledger_so_a_restart_keeps_the_cap(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    led.record(row(session="a", route="cloud", cost_usd=0.02))
    led.record(row(session="a", route="local", cost_usd=5.0))  # local spend is not cloud spend
    b = Budget(per_session_usd=0.02, ledger=led)
    assert b.exceeded("a") == "session" and b.exceeded("z") is None
    assert Budget(per_day_usd=0.03, ledger=led).exceeded("z") is None
    led.close()


def test_bad_action():
    with pytest.raises(ValueError, match="budget action"):
        Budget(action="shrug")
