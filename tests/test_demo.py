"""The demo job, reduced to a few hundred digits, with its workdir on the S3 server."""

from __future__ import annotations

import json

import pytest

from jobs import demo

pytestmark = pytest.mark.timeout(300)


def test_reduced_demo_end_to_end_on_s3(ray_session, s3, bucket, capsys):
    result = demo.main(
        ["--set", f"demo.workdir=s3://{bucket}/demo", "--set", "demo.limit=250"]
    )  # configs/demo.yaml by default
    printed = capsys.readouterr().out

    assert result["images"] == 250 and result["manifest"]["samples"] == 250
    assert result["features"]["rows"] == 250 and result["features"]["dim"] == 1280
    test = result["predictions"]["metrics"]["test"]
    assert test["samples"] == result["manifest"]["splits"]["test"]["samples"] >= 45
    # Lite0's ImageNet features separate handwritten digits even from 175 training images
    # (the full demo reaches ~96%); a broken backbone or preprocessing lands near 10%.
    assert test["top1"] >= 0.8
    # Classifying the images end to end agrees with the head's score on the cached features.
    assert abs(test["top1"] - result["head"]["test"]["top1"]) <= 0.02
    assert f"TEST ACCURACY: {test['top1']:.2%}" in printed and f"s3://{bucket}/demo/head/curves.png" in printed
    assert printed.rstrip().endswith(f"HTML report: s3://{bucket}/demo/head/report.html")
    page = s3.get_object(Bucket=bucket, Key="demo/head/report.html")["Body"].read().decode()
    assert "Embedding map" in page and "Galleries" in page and "Training curves" in page
    assert f"<td>test rows (labelled)</td><td>{test['samples']}</td>" in page

    keys = {
        o["Key"]
        for o in s3.list_objects_v2(Bucket=bucket, Prefix="demo/", MaxKeys=1000)["Contents"]
        if not o["Key"].startswith("demo/digits/")
    }
    assert {
        "demo/config.yaml",
        "demo/prepared/manifest.json",
        "demo/features/features.json",
        "demo/head/head.pt",
        "demo/head/confusion.png",
        "demo/predictions/predictions.json",
        "demo/predictions/test/part-000000.parquet",
    } <= keys
    head = json.loads(s3.get_object(Bucket=bucket, Key="demo/head/head.json")["Body"].read())
    assert head["classes"] == [str(d) for d in range(10)] and head["backbone"] == "efficientnet_lite0"
