"""Model actors' start-up in the job's timings: the first actor ready and the slowest load, with phases."""

from __future__ import annotations

import time

import pytest

from pipeline import startup


def record(entered_at: float, weights: float, model: float, engine: float, notes=()) -> dict:
    return {
        "entered_at": entered_at,
        "phases": {"weights": weights, "model": model, "onnxruntime": engine},
        "notes": list(notes),
    }


def test_the_first_ready_and_the_slowest_load():
    records = [
        record(100.0, 0.1, 0.4, 6.0, ["ONNX exported"]),  # entered first, but exported: ready at 106.5
        record(101.0, 0.1, 0.5, 0.4, ["ONNX export cached"]),  # ready at 102.0: the first ready
    ]
    summary = startup.summarize(records, started_at=98.0)
    assert summary["actors"] == 2
    assert summary["first_ready_s"] == 4.0 and summary["first"]["before_constructor_s"] == 3.0
    assert summary["slowest_load_s"] == 6.5 and summary["slowest"]["notes"] == ["ONNX exported"]
    assert startup.timings(summary) == {
        "model actors: first ready, from the stage's start": 4.0,
        "model actors: slowest load (weights, model, engine)": 6.5,
    }
    line = startup.describe(summary)
    assert line.startswith("model actor start-up (2 actors): the first ready 4.0 s after the stage began")
    assert "the slowest load 6.5 s (weights 0.1, model 0.4, onnxruntime 6.0; ONNX exported)" in line


def test_no_actors_no_entries():
    assert startup.summarize([], started_at=1.0) == {"actors": 0}
    assert startup.timings({"actors": 0}) == {}
    one = startup.summarize([record(10.0, 0.2, 0.3, 0.5)], started_at=8.0)
    assert startup.describe(one) == (
        "model actor start-up: ready 3.0 s after the stage began "
        "(scheduling, process start, imports 2.0, weights 0.2, model 0.3, onnxruntime 0.5)"
    )


@pytest.mark.timeout(60)
def test_the_log_lives_on_the_drivers_node_and_a_lost_log_never_fails_the_job(ray_session):
    import ray

    log = startup.new_log()
    log.add.remote({"entered_at": time.time(), "phases": {"weights": 0.1}, "notes": []})
    assert startup.read(log)["actors"] == 1
    node = ray.get(log.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
    assert node == ray.get_runtime_context().get_node_id()  # not on a worker node that may be lost

    ray.kill(log)  # asynchronous: a call sent just after may still be answered
    deadline = time.time() + 30
    while "lost" not in (lost := startup.read(log)) and time.time() < deadline:
        time.sleep(0.2)
    assert lost == {"actors": 0, "lost": "ActorDiedError"}
    assert startup.timings(lost) == {}
    assert startup.describe(lost) == "model actor start-up: not recorded (the log was lost: ActorDiedError)"
