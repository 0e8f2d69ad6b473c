"""Prefect flow of the ``sample`` stage: thin tasks around :mod:`flows.sample.generate`.

One task per MVImgNet object, per DreamBench subject and per shard of OpenImages images; tasks
pass file paths (cut-out manifests, CSV-row files), never pixels. The output is staged in
``<out_dir>.partial`` and renamed into place when every task has finished.
"""

from __future__ import annotations

from pathlib import Path

from flows.runtime import configure

configure()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows.config.params import SampleParams, load_params  # noqa: E402
from flows.sample import generate  # noqa: E402
from flows.sample.plan import ImagePlan, ObjectPlan, SamplePlan, plan_sample  # noqa: E402

WORKERS = 2  # threads; rendering is serialised by a lock, compositing and encoding overlap


@task(name="sample-object", cache_policy=NO_CACHE)
def object_task(obj: ObjectPlan, params: SampleParams, base: Path) -> Path:
    manifest = generate.generate_object(obj, params, base)
    get_run_logger().info("object %d/%d %s/%s (%s, %d views) written", obj.index + 1, params.n_objects,
                          obj.class_id, obj.object_id, obj.render.kind, obj.n_views)
    return manifest


@task(name="sample-openimages-shard", cache_policy=NO_CACHE)
def openimages_task(images: list[ImagePlan], manifests: list[Path], params: SampleParams, base: Path) -> list[Path]:
    rows = generate.generate_openimages_shard(images, manifests, params, base)
    get_run_logger().info("openimages: %d images written", len(images))
    return rows


@task(name="sample-dreambench-subject", cache_policy=NO_CACHE)
def dreambench_task(plan: SamplePlan, index: int, params: SampleParams, base: Path) -> Path:
    folder = generate.generate_dreambench_subject(plan, index, params, base)
    get_run_logger().info("dreambench subject %s written", folder.name)
    return folder


@task(name="sample-finish", cache_policy=NO_CACHE)
def finish_task(plan: SamplePlan, params: SampleParams, base: Path, rows: list[Path]) -> Path:
    return generate.finish(plan, params, base, rows)


@flow(name="sample", task_runner=ThreadPoolTaskRunner(max_workers=WORKERS))
def sample_flow(params_path: str = "params.yaml") -> str:
    """Generate the sample data set described by the ``sample`` section of ``params_path``."""
    params = load_params(params_path).sample
    target = Path(params.out_dir)
    plan = plan_sample(params)
    base = generate.begin(target)
    objects = [object_task.submit(obj, params, base) for obj in plan.objects]
    subjects = [dreambench_task.submit(plan, i, params, base) for i in range(len(plan.dreambench))]
    manifests = [f.result() for f in objects]
    shards = [openimages_task.submit(shard, manifests, params, base) for shard in generate.shards(plan)]
    rows = [path for f in shards for path in f.result()]
    for f in subjects:
        f.result()
    finish_task(plan, params, base, rows)
    out = generate.publish(base, target)
    get_run_logger().info("sample written to %s", out)
    return str(out)


def main(params_path: str = "params.yaml") -> None:
    sample_flow(params_path=params_path)
