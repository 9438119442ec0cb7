import numpy as np

from serving.reasons import phrase, top_reasons


def test_reasons_are_the_largest_pushes_toward_churn_in_plain_words():
    names = ["days_since_session", "open_rate_trend", "sessions_7d", "consecutive_unopened"]
    x = np.array([[21.0, 0.5, 0.0, 6.0], [1.0, 1.2, 9.0, 0.0]])
    contrib = np.array([[0.9, 0.4, 0.1, 0.6, -2.0],      # last column: the bias term
                        [-0.5, -0.1, -0.3, -0.2, -2.0]])
    reasons = top_reasons(contrib, x, names, k=3)
    assert reasons[0] == ["no session for 21 days", "6 messages in a row unopened", "open rate at 50% of its 90-day level"]
    assert reasons[1] == []   # nothing pushes this user toward churn


def test_phrases_cover_windows_and_fall_back_to_the_name():
    assert phrase("sessions_7d", 0) == "0 sessions in the last 7 days"
    assert phrase("days_since_open", float("nan")) == "never opened a message"
    assert phrase("utc_offset_hours", 8) == "utc offset hours = 8"


def test_categorical_reasons_name_the_level_not_its_code():
    cats = {"segment": ("high_value", "potential", "silent")}
    assert phrase("segment", 2.0, cats["segment"]) == "segment: silent"
    assert phrase("segment", float("nan"), cats["segment"]) == "segment: unknown"
    reasons = top_reasons(np.array([[0.5, 0.0]]), np.array([[1.0]]), ["segment"], k=1, categories=cats)
    assert reasons == [["segment: potential"]]
