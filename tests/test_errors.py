"""How a job fails: the project's user-facing errors (`pipeline.errors.UserError` and its kinds, storage
errors) end it in one line, also when a Ray task or a Ray Data function raised them; anything else is a bug
and keeps its traceback."""

from __future__ import annotations

import pytest
import ray

from jobs.common import run_job, user_error
from pipeline import storage
from pipeline.config import ConfigError
from pipeline.errors import UserError
from pipeline.prepare import PrepareError


def fail(exc: BaseException):
    raise exc


@pytest.mark.parametrize(
    "exc", [UserError("s3://b/x: no such thing; do this"), ConfigError("bad key"), storage.StorageError("s3://b: gone")]
)
def test_a_user_error_ends_the_job_in_one_line(exc):
    with pytest.raises(SystemExit) as ended:
        run_job("features", fail, exc)
    assert ended.value.code == f"imgpipe features: {exc}"


@pytest.mark.parametrize("exc", [ValueError("operands could not be broadcast"), KeyError("label"), TypeError("x")])
def test_an_internal_error_keeps_its_traceback(exc):
    with pytest.raises(type(exc)) as raised:
        run_job("features", fail, exc)
    assert raised.value is exc


@ray.remote(num_cpus=0, max_retries=0)
def task(exc: BaseException):
    raise exc


@pytest.mark.timeout(120)
def test_errors_raised_in_ray_tasks_and_ray_data_functions(ray_session):
    with pytest.raises(ray.exceptions.RayTaskError) as user:
        ray.get(task.remote(PrepareError("s3://b/src: 3 inputs but 2 rows; fix the label file")))
    assert user_error(user.value) == "s3://b/src: 3 inputs but 2 rows; fix the label file"
    with pytest.raises(ray.exceptions.RayTaskError) as internal:
        ray.get(task.remote(ValueError("shapes (3,) and (4,) not aligned")))
    assert user_error(internal.value) is None

    def udf(batch, exc):
        raise exc

    for exc, expected in (
        (UserError("s3://b/x.tar: not a readable tar"), "s3://b/x.tar: not a readable tar"),
        (ValueError("internal"), None),
    ):
        with pytest.raises(Exception) as caught:
            ray.data.range(4, override_num_blocks=1).map_batches(udf, fn_kwargs={"exc": exc}).take_all()
        assert user_error(caught.value) == expected
