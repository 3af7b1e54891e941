"""The teacher cache on an S3 API (issue 18): a local moto server on 127.0.0.1 (a real S3 protocol, started and stopped
here), the endpoint given in the URI (pyarrow's documented form, query kept apart from the path) or by the
environment; precompute on Ray actors, inspect, verify, rebuild and a training stage read it; an unreachable root is
one clear error before any actor starts."""

from __future__ import annotations

import json
import socket

import pytest

from curriculum.errors import CacheError
from curriculum.files import check_root, join_uri, redact_uri, resolve_fs, storage_env, storage_runtime_env
from teachers.cache import find_caches, format_inspect, inspect_cache
from teachers.precompute import open_dataset, precompute, rebuild
from teachers.readers import CacheReader
from teachers.verify import verify_cache

from test_pool import job, setup  # noqa: F401  (the module's fixture: a teacher and 8 images)

moto_server = pytest.importorskip("moto.server")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with the bucket `cachebucket`; yields its host:port."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"127.0.0.1:{port}"
    fs, _ = resolve_fs(f"s3://testing:testing@cachebucket?endpoint_override={endpoint}&scheme=http&region=us-east-1"
                       "&allow_bucket_creation=true")
    fs.create_dir("cachebucket")
    yield endpoint
    server.stop()


def uri_form(endpoint: str, prefix: str) -> str:
    """Everything in the URI (the Ray actors need no environment): credentials, endpoint, scheme."""
    return f"s3://testing:testing@cachebucket/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def test_the_object_store_environment_is_what_actors_are_given():
    env = {"AWS_ENDPOINT_URL": "http://h:1", "AWS_SECRET_ACCESS_KEY": "s", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
           "HOME": "/root", "XAWS_NOT": "x"}
    assert storage_env(env) == {k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY",
                                                    "GOOGLE_APPLICATION_CREDENTIALS")}
    assert storage_runtime_env({"AWS_REGION": "eu"}) == {"env_vars": {"AWS_REGION": "eu"}}
    assert storage_runtime_env({}) is None


def test_join_uri_keeps_the_query_at_the_end():
    root = "s3://cachebucket/cache?endpoint_override=127.0.0.1:5055&scheme=http"
    assert join_uri(root, "fcos-ab12", "d-v-s/") == \
        "s3://cachebucket/cache/fcos-ab12/d-v-s?endpoint_override=127.0.0.1:5055&scheme=http"
    assert join_uri("s3://b/", "x") == "s3://b/x" and join_uri("/tmp/c", "x") == "/tmp/c/x"
    assert redact_uri("s3://key:secret@b/c?x=1") == "s3://***@b/c?x=1" and redact_uri("/tmp/a") == "/tmp/a"


@pytest.mark.parametrize("form", ["uri", "environment"])
def test_precompute_inspect_verify_rebuild_and_a_stage_on_s3(setup, s3, ray_session, tmp_path, monkeypatch,  # noqa: F811
                                                           form):
    """Both forms of the endpoint. The environment form's variables are set after Ray started, as when a user
    exports them in the shell of a driver that joins a running cluster: the actors and Ray Train workers get them
    from the driver (`curriculum.files.storage_runtime_env`), not from their node."""
    d, images, ann = setup
    if form == "uri":
        root = uri_form(s3, "cache")
    else:
        for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{s3}"}.items():
            monkeypatch.setenv(k, v)
        root = "s3://cachebucket/env-cache-ray"
    (report,) = precompute(job(d, images, ann, root), progress=False)
    if form == "uri":
        assert report.cache.startswith("s3://testing:testing@cachebucket/cache/") and report.cache.endswith(
            f"?endpoint_override={s3}&scheme=http&region=us-east-1")
    else:
        assert report.cache.startswith(root + "/") and "?" not in report.cache
    assert len(report.computed) == 4  # 8 images, shards of 2
    info = inspect_cache(report.cache)
    assert info["complete"] and info["images"] == 8 and "complete" in format_inspect(info)
    assert find_caches(root) == [report.cache]
    v = verify_cache(report.cache, sample=2)
    assert v["ok"], v
    # A shard rebuilt alone is the same shard.
    fs, path = resolve_fs(report.cache)
    shard = f"{path}/shards/shard-00001.parquet"
    before = fs.open_input_stream(shard).read()
    r = rebuild(report.cache, [1])
    assert r.computed == [1] and fs.open_input_stream(shard).read() == before
    # The rows read back from S3 are the rows a local cache holds.
    (local,) = precompute(job(d, images, ann, str(tmp_path / "local")), progress=False)
    ids = open_dataset(images, ann, 128).image_ids[:3]
    for a, b in zip(CacheReader(report.cache).rows(ids, ["h128w128f0"] * 3),
                    CacheReader(local.cache).rows(ids, ["h128w128f0"] * 3)):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # A short training stage on Ray Train reads its targets from the S3 cache (through the object store).
    from curriculum.config import TrainJobConfig, config_from_dict, to_dict
    from trainers.ray_train import fit_on_ray

    tjob = config_from_dict(TrainJobConfig, {
        "output_dir": str(tmp_path / "stage"), "model": {"name": "retinanet_mobilenetv3_micro"},
        "data": {"root": str(d), "builtin": "none", "train_images": images, "train_annotations": ann,
                 "val_images": images, "val_annotations": ann, "image_size": 128, "flip": "none"},
        "train": {"epochs": 1, "batch_size": 4, "max_iters_per_epoch": 2, "warmup_iters": 1}})
    stage = {"index": 0, "name": "1-s3", "teachers": [{"name": "retinanet_mobilenetv3_micro", "checkpoint":
             str(d / "teacher.pt"), "weight": 1.0, "cache": report.cache, "class_map": None, "adapter": None}],
             "epochs": 1, "losses": [{"name": "mgd", "preset": "retinanet"}], "lr": None,
             "decay_kind": "constant", "decay_params": {}, "decay_offset": 0, "decay_t_max": 1, "kd_ratio": None,
             "init": None}
    state = fit_on_ray(tjob, num_workers=1, cpus_per_worker=0.5, storage_path=str(tmp_path / "ray"), name="s3",
                       stage=stage, progress=False)
    (record,) = json.loads(state["history"])
    assert any(k.startswith("distill_") and v > 0 for k, v in record.items() if isinstance(v, float)), record
    assert to_dict(tjob)["train"]["epochs"] == 1


def test_the_environment_form_reads_and_writes_in_process(setup, s3, tmp_path, monkeypatch):  # noqa: F811
    """`AWS_ENDPOINT_URL` and the credentials from the environment, a plain s3:// root (the Ray actors of a cluster
    get that environment from the cluster's set-up)."""
    from teachers.cache import CacheKey, TeacherCache, shard_entry, table_to_bytes

    for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{s3}"}.items():
        monkeypatch.setenv(k, v)
    root = "s3://cachebucket/env-cache"
    check_root(root)
    key = CacheKey("t", "tfp", "dfp", {"out_h": 8, "out_w": 8, "views": ["noflip"]},
                   {"targets": ["features"], "levels": None, "compression": {}})
    cache = TeacherCache.create_or_resume(root, key, {"teacher": {}, "data": {}, "batch_size": 1}, [1, 2], 2)
    assert cache.uri == "s3://cachebucket/env-cache/" + key.relpath()
    import pyarrow as pa

    data = table_to_bytes(pa.table({"x": [1, 2]}), cache.shard_meta(0))
    cache.commit(0, cache.write_tmp(0, data), shard_entry(0, data, 2, (0, 2)))
    cache.write_manifest(force=True)
    again = TeacherCache.open(cache.uri)
    assert again.manifest["shards"]["00000"]["rows"] == 2 and find_caches(root) == [cache.uri]


def test_an_unreachable_root_is_one_clear_error_before_any_actor(setup, tmp_path):  # noqa: F811
    d, images, ann = setup
    dead = uri_form(f"127.0.0.1:{_free_port()}", "cache")
    dispatched = []
    with pytest.raises(CacheError, match=r"cache root 's3://\*\*\*@cachebucket/cache\?.*' cannot be reached: .*"
                                         r"Check the endpoint"):
        precompute(job(d, images, ann, dead), progress=False, on_dispatch=lambda *a: dispatched.append(a))
    assert not dispatched
