"""Celery's generator-chord integration test, run against real kojin_pg workers.

The body of ``test_generator`` is Celery's ``t/integration/test_canvas.py::test_chord::
test_generator`` (https://github.com/celery/celery at commit
5dc781f0bd5f36186bfcc74e0a4f9f654452c69b, BSD 3-clause licence, copyright Asif Saif Uddin, Ask
Solem and contributors), adapted to this suite's fixtures: ``manager.app`` is the end-to-end app
(broker and backend on kojin_pg), its tasks run in a real ``celery worker``, and Celery's "Requires
redis result backend" skip is dropped. Celery parametrizes ``size`` over 3..9 (each costs
``size`` seconds of generator sleeps); the smallest and the largest run here. It is the only
generator-header test in that file.
"""

from __future__ import annotations

from time import sleep

import pytest
from celery import chord
from workers import wait_ready

pytestmark = pytest.mark.e2e

TIMEOUT = 60  # Celery's own


@pytest.fixture
def worker(e2e_app, workers):
    w = workers(pool="threads", concurrency=4)
    wait_ready(e2e_app, w)
    return w


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [3, 9])
def test_generator(e2e_app, worker, tmp_path, size):
    write_to_file_and_return_int = e2e_app.tasks["e2e.write_to_file_and_return_int"]
    tsum = e2e_app.tasks["e2e.tsum"]

    def assert_generator(file_name):
        for i in range(size):
            sleep(1)
            if i == size - 1:
                with open(file_name) as file_handle:
                    # ensures chord header generators tasks are processed incrementally #3021
                    assert file_handle.readline() == '0\n', "Chord header was unrolled too early"

            yield write_to_file_and_return_int.s(file_name, i)

    file_name = str(tmp_path / "chord_header_parts.txt")
    open(file_name, "w").close()
    c = chord(assert_generator(file_name), tsum.s())
    assert c().get(timeout=TIMEOUT) == size * (size - 1) // 2
