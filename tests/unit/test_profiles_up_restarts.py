"""When `profiles up` starts a dead service again, and when it gives up."""

from __future__ import annotations

from profiles_cli.up import CRASH_LIMIT, CRASH_WINDOW_SECONDS, Restarts, describe_exit


def test_a_service_that_keeps_dying_waits_longer_each_time_then_is_given_up() -> None:
    restarts = Restarts()
    delays = [restarts.after_death(now) for now in (0.0, 1.0, 3.0, 6.0)]
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert restarts.after_death(12.0) is None  # the fifth death within a minute


def test_the_first_delay_is_a_setting_and_the_later_ones_double_it() -> None:
    restarts = Restarts(first_delay=0.05)
    delays = [restarts.after_death(now) for now in (0.0, 0.1, 0.2, 0.3)]
    assert delays == [0.05, 0.1, 0.2, 0.4]
    assert restarts.after_death(0.4) is None


def test_deaths_older_than_the_window_are_forgotten() -> None:
    restarts = Restarts()
    for index in range(CRASH_LIMIT - 1):
        restarts.after_death(float(index))
    later = CRASH_LIMIT + CRASH_WINDOW_SECONDS
    assert restarts.after_death(later) == 0.5  # a fresh start: the first recent death


def test_exit_statuses_read_as_a_person_reads_them() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "killed by SIGKILL"
