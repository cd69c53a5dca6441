import pytest

from userproxy.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30), ("1m30s", 90), ("1h", 3600), ("0", 0), ("1.5s", 1.5)],
)
def test_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "s", "1x", "1s2", "-1s"])
def test_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_format_round_trips() -> None:
    for seconds in (0.25, 30.0, 1.0, 90.0):
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
