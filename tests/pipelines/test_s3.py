"""The caption job against a real S3-compatible server on loopback (moto's server, started and stopped here):
s3 in and s3 out, a resume in slices (exactly once), --retry-errors for rows whose images were on an endpoint
that was down (transient: redone) beside one whose image does not exist (the row's own fault: kept), and a job
record that never holds the credentials given in the URI."""

from __future__ import annotations

import json
import os
import socket

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines.caption import run_caption_job
from pipelines.job_record import JOB_FILE
from tests.pipelines.conftest import png_bytes

pytestmark = pytest.mark.ray
KEY, SECRET = "AKIDTESTING", "sEcReTtEsTiNg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """(endpoint host:port, a pyarrow S3FileSystem on it) with bucket `jobs`; credentials in the environment
    before Ray starts, so its workers have them too."""
    server_module = pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) is not installed")
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    try:
        server.start()
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"moto's S3 server could not start: {e}")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"})
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key=KEY, secret_key=SECRET,
                           region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("jobs")
    yield f"127.0.0.1:{port}", fs
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def ray_s3(s3, ray_local):
    return ray_local


def read_rows(fs: pafs.S3FileSystem, prefix: str) -> list[dict]:
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(prefix)) if f.path.endswith(".parquet")]
    return [r for f in sorted(files) for r in pq.read_table(f, filesystem=fs).to_pylist()]


def test_s3_in_s3_out_a_slice_then_the_rest_with_retry_errors(s3, ray_s3, job_config):
    from moto.server import ThreadedMotoServer

    endpoint, fs = s3
    query = f"?endpoint_override={endpoint}&scheme=http"
    down = free_port()  # rows 0 and 4 read their image through a second endpoint, down until the retry (each
    # such read costs ~6 s: pyarrow's own retries)
    rows = [{"id": f"r{i}", "image_path": f"s3://jobs/imgs/{i}.png"
             + (f"?endpoint_override=127.0.0.1:{down}&scheme=http" if i in (0, 4) else query)} for i in range(9)]
    for i in range(9):
        if i != 5:  # r5's image does not exist
            with fs.open_output_stream(f"jobs/imgs/{i}.png") as f:
                f.write(png_bytes(i))
    pq.write_table(pa.Table.from_pylist(rows), "jobs/in/part-0.parquet", filesystem=fs)
    source = f"s3://jobs/in{query}"
    output = f"s3://{KEY}:{SECRET}@jobs/out{query}"  # credentials in the URI: used, never recorded

    first = run_caption_job(source, output, job_config, limit=4)  # a slice of 4 rows
    done = read_rows(fs, "jobs/out")
    assert (first.rows, first.total_rows, len(done)) == (4, 4, 4)
    kinds = {r["id"]: r["error_kind"] for r in done}
    assert kinds == {r["id"]: ("transient" if r["id"] in ("r0", "r4") else "input" if r["id"] == "r5"
                               else None) for r in done}
    assert first.transient_errors == sum(k == "transient" for k in kinds.values())
    second_endpoint = ThreadedMotoServer(ip_address="127.0.0.1", port=down, verbose=False)  # it comes back
    second_endpoint.start()  # (moto's servers in one process share their buckets)
    try:
        second = run_caption_job(source, output, job_config, retry_errors="transient")  # those and the other 5
    finally:
        second_endpoint.stop()
    got = read_rows(fs, "jobs/out")
    assert (second.rows, second.errors, second.total_rows) == (5 + first.transient_errors, 1, 9)
    assert sorted(r["id"] for r in got) == [r["id"] for r in rows]  # exactly once
    assert [(r["id"], r["error_kind"]) for r in got if r["error"]] == [("r5", "input")]  # not retried, or again

    with fs.open_input_stream(f"jobs/out/{JOB_FILE}") as f:
        text = f.read().decode()
    job = json.loads(text)
    assert [r["status"] for r in job["runs"]] == ["finished"] * 2
    assert SECRET not in text and KEY not in text
    assert fs.get_file_info("jobs/out/_checkpoint").type == pafs.FileType.Directory  # beside the rows
