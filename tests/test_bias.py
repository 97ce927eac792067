"""Counterfactual text and counterfactual-augmented training rows, on fixed sentences."""

import pandas as pd
import pytest

from tasks.bias import augment_rows, counterfactual, swap_turns
from tasks.data import MESSAGES


@pytest.mark.parametrize(
    "category, text, expected",
    [
        ("gender", "John said he would call his mother.", "Mary said she would call her father."),
        ("gender", "She gave HER book to Mr Smith.", "He gave HIS book to Ms Smith."),
        ("gender", "Please mark the answer, then ask Mark.", "Please mark the answer, then ask Nancy."),
        ("nationality", "An American doctor moved to France.", "A Nigerian doctor moved to China."),
        ("religion", "The Christian priest left the church.", "The Muslim imam left the mosque."),
        ("age", "The young students met an elderly teacher.", "The old retirees met a youth teacher."),
    ],
)
def test_terms_swap_by_whole_word_keeping_case(category, text, expected) -> None:
    assert counterfactual(text, category) == expected
    assert counterfactual(expected, category) is not None  # and back


def test_text_without_a_term_has_no_counterfactual() -> None:
    assert counterfactual("What is 2 plus 2?", "gender") is None
    assert counterfactual("Theme and heritage", "gender") is None  # whole words only: no "he" inside
    with pytest.raises(ValueError, match="Unknown counterfactual category"):
        counterfactual("x", "height")


def test_augmented_rows_add_a_swapped_copy_of_each_row_a_swap_changes() -> None:
    rows = pd.DataFrame(
        {
            MESSAGES: [
                [
                    {"role": "user", "content": "Should he get the job?"},
                    {"role": "assistant", "content": "Yes, he should."},
                ],
                [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}],
            ]
        }
    )
    out = augment_rows(rows, ["gender"])
    assert len(out) == 3 and list(out[MESSAGES][:2]) == list(rows[MESSAGES])
    assert out[MESSAGES][2] == [
        {"role": "user", "content": "Should she get the job?"},
        {"role": "assistant", "content": "Yes, she should."},
    ]
    assert augment_rows(rows, []) is rows
    assert swap_turns(rows[MESSAGES][1], "religion") is None
