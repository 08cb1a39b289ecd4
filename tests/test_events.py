"""run_to_end: how the plain run_* functions drive a job's event generator."""

import pytest

from napari_pathoseg.events import run_to_end


class Done:
    def __init__(self, value):
        self.value = value


def test_returns_the_final_event_and_reports_every_event():
    seen = []
    done = run_to_end(iter([1, 2, Done("x")]), Done, progress=seen.append)
    assert done.value == "x"
    assert seen[:2] == [1, 2] and seen[2] is done


def test_a_job_without_its_result_is_an_error():
    with pytest.raises(RuntimeError, match="without a Done"):
        run_to_end(iter([1, 2]), Done)
