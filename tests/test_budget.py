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


def test_the_daily_cap_starts_again_at_utc_midnight_and_the_session_cap_does_not():
    now = [1_700_000_000.0 - 1_700_000_000.0 % 86400 + 86400 - 60]  # one minute to midnight UTC
    b = Budget(per_session_usd=0.015, per_day_usd=0.01, clock=lambda: now[0])
    b.add("a", 0.01)
    assert b.exceeded("b") == "daily"
    now[0] += 59
    assert b.exceeded("b") == "daily"  # still the same day
    now[0] += 1
    assert b.exceeded("b") is None  # a new UTC day
    b.add("a", 0.005)
    assert b.exceeded("a") == "session"  # 0.015 over both days: a session's cap never resets
    assert b.exceeded("b") is None


def test_spend_seeded_from_the_ledger_counts_only_today_toward_the_daily_cap(tmp_path):
    midnight = 1_700_000_000.0 - 1_700_000_000.0 % 86400
    led = Ledger(tmp_path / "l.sqlite")
    led.record(row(session="a", route="cloud", cost_usd=0.02, ts=midnight - 10))  # yesterday
    led.record(row(session="b", route="cloud", cost_usd=0.005, ts=midnight + 10))  # today
    b = Budget(per_day_usd=0.01, per_session_usd=0.02, ledger=led, clock=lambda: midnight + 3600)
    assert b.exceeded("c") is None and b.exceeded("a") == "session"
    b.add("c", 0.005)
    assert b.exceeded("c") == "daily"
    led.close()
