"""The typed schema of params.yaml: one frozen dataclass per stage namespace.

params.yaml is the single source of parameters and this module is the only reader of
it (through :func:`load_params`). Every field carries a comment; unknown keys and wrong
types are rejected with a one-line message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from cc_model.config import EvaluateParams, ModelParams, SamplingParams, TrainParams
from flows.config.typed import ParamsError, at_least, between, from_mapping, not_above

DEFAULT_PARAMS = Path("params.yaml")


@dataclass(frozen=True, kw_only=True)
class SampleParams:
    """The deterministic sample data set (stage ``sample``)."""

    seed: int = 0  # every random choice derives from this; same seed -> byte-identical output
    out_dir: str = "data/sample"  # where the three data set roots are written
    n_objects: int = 12  # MVImgNet objects rendered (meshes and procedural shapes)
    n_views: int = 12  # frames per object, evenly spaced around an orbit
    n_openimages_boxes: int = 40  # OpenImages boxes in total (several per image)
    n_dreambench_subjects: int = 4  # DreamBench-layout subjects for evaluation
    dreambench_images_per_subject: int = 4  # reference photos per DreamBench subject
    frame_width: int = 480  # rendered MVImgNet frame size in pixels
    frame_height: int = 360  # (at least 64 each)
    openimages_mask_scale: float = 0.5  # OpenImages mask PNGs are stored at reduced resolution
    plant_faults: bool = True  # plant the faults of a real crawl (truncated JPEG, blur, ...)

    def __post_init__(self) -> None:
        at_least(self, 1, "n_objects", "n_views", "dreambench_images_per_subject")
        at_least(self, 0, "n_openimages_boxes", "n_dreambench_subjects")
        at_least(self, 64, "frame_width", "frame_height")
        between(self, 0.0, 1.0, "openimages_mask_scale")


@dataclass(frozen=True, kw_only=True)
class SourcesParams:
    """Roots of the data sets on disk. The sample is only one set of roots."""

    mvimgnet_root: str = "data/sample/mvimgnet"  # <class_id>/<object_id>/images/<frame>.jpg
    mvimgnet_mask_root: str = "data/sample/mvimgnet_masks"  # <class_id>/<object_id>/<frame>.jpg.png
    mvimgnet_categories: str = "data/sample/mvimgnet/mvimgnet_category.txt"  # lines "id,name"
    openimages_root: str = "data/sample/openimages"  # holds <split>/, masks/ and the CSVs
    openimages_split: str = "train"  # image folder and CSV prefix
    openimages_boxes_csv: str = "oidv6-train-annotations-bbox.csv"  # relative to openimages_root
    openimages_segmentation_csv: str = "train-annotations-object-segmentation.csv"
    openimages_classes_csv: str = "oidv7-class-descriptions.csv"
    dreambench_root: str = "data/sample/dreambench"  # dataset/<subject>/NN.jpg + prompts file
    enabled: list[Literal["mvimgnet", "openimages"]] = field(
        default_factory=lambda: ["mvimgnet", "openimages"]
    )  # which sources ingest reads


@dataclass(frozen=True, kw_only=True)
class IngestParams:
    """Discovery and probing of every frame (stage ``ingest``)."""

    out_dir: str = "data/ingest"  # frames.parquet, rejects.parquet
    frames_per_shard: int = 256  # work unit of one Prefect task
    max_workers: int = 2  # shard tasks at once (threads; with cluster.address, shards in flight on the cluster)
    probe_side: int = 256  # longest side of the grayscale copy used for blur and phash

    def __post_init__(self) -> None:
        at_least(self, 1, "frames_per_shard", "max_workers")
        at_least(self, 32, "probe_side")


@dataclass(frozen=True, kw_only=True)
class AreaRange:
    """Subject area as a fraction of the image."""

    min: float  # below this the subject is too small
    max: float  # above this the subject fills the frame (no context, bad crops)

    def __post_init__(self) -> None:
        between(self, 0.0, 1.0, "min", "max")
        not_above(self, "min", "max")


@dataclass(frozen=True, kw_only=True)
class FilterParams:
    """Quality filters (stage ``filter``); defaults follow AnyDoor (MVImgNet) and ELITE (OpenImages)."""

    out_dir: str = "data/filter"  # frames.parquet (accepted), rejects.parquet, metrics.json
    min_image_side: int = 128  # pixels; smaller images are rejected as low_resolution
    min_box_side: int = 100  # pixels, OpenImages boxes (ELITE)
    box_aspect_min: float = 0.5  # width / height of an OpenImages box (ELITE: 0.5..2)
    box_aspect_max: float = 2.0  # and at most this
    mvimgnet_area: AreaRange = field(default_factory=lambda: AreaRange(min=0.01, max=0.64))
    openimages_area: AreaRange = field(default_factory=lambda: AreaRange(min=0.02, max=0.8))  # of the box (ELITE)
    min_largest_component: float = 0.9  # MVImgNet: largest connected component holds more (AnyDoor)
    min_blur_score: float = 40.0  # variance of the Laplacian at probe_side; lower is blurry
    near_duplicate_hamming: int = 4  # phash distance at or below which two images are duplicates
    exclude_group_of: bool = True  # OpenImages IsGroupOf boxes cover several objects
    exclude_depiction: bool = False  # OpenImages IsDepiction (drawings, toys of the class)
    class_allow: list[str] = field(default_factory=list)  # class names; empty = allow all
    class_deny: list[str] = field(default_factory=list)  # class names never used
    min_views_per_object: int = 4  # MVImgNet objects with fewer accepted views are dropped

    def __post_init__(self) -> None:
        at_least(self, 1, "min_image_side", "min_views_per_object")
        at_least(self, 0, "min_box_side", "min_blur_score")
        at_least(self, 0.0, "box_aspect_min")  # 0: no lower bound
        not_above(self, "box_aspect_min", "box_aspect_max")
        between(self, 0.0, 1.0, "min_largest_component")
        between(self, 0, 64, "near_duplicate_hamming")  # bits of the 64-bit perceptual hash


@dataclass(frozen=True, kw_only=True)
class SegmentParams:
    """Subject masks (stage ``segment``): the data set's own masks, else SAM from the box."""

    out_dir: str = "data/segment"  # masks.parquet
    mode: Literal["provided", "refine"] = "provided"  # refine: re-run SAM on provided masks, keep the better
    sam_profile: Literal["tiny", "sam"] = "tiny"  # tiny: random small SAM built in code (masks meaningless)
    sam_model_type: Literal["vit_h", "vit_l", "vit_b"] = "vit_h"  # for sam_profile sam
    sam_checkpoint: str = "models/sam_vit_h_4b8939.pth"  # for sam_profile sam
    batch_images: int = 4  # images per SAM image-encoder batch
    frames_per_shard: int = 256  # work unit of one Prefect task
    refine_min_gain: float = 0.02  # refine keeps SAM's mask only if its stability beats the provided by this

    def __post_init__(self) -> None:
        at_least(self, 1, "batch_images", "frames_per_shard")  # refine_min_gain: any value (>= 1: never replace)


@dataclass(frozen=True, kw_only=True)
class EmbedParams:
    """CLIP appearance embeddings of the segmented subjects (stage ``embed``)."""

    out_dir: str = "data/embed"  # embeddings.parquet
    profile: Literal["tiny", "sd15", "named"] = "tiny"  # tiny: random small open_clip; sd15: ViT-H-14
    model: str = "ViT-H-14"  # open_clip model name (profile sd15 or named)
    pretrained: str = "laion2b_s32b_b79k"  # open_clip pretrained tag or a local checkpoint path
    batch_size: int = 32  # images per forward
    num_workers: int = 2  # DataLoader workers that decode, crop and resize
    background_rgb: list[int] = field(default_factory=lambda: [124, 116, 104])  # fill outside the mask

    def __post_init__(self) -> None:
        at_least(self, 1, "batch_size")
        at_least(self, 0, "num_workers")
        if len(self.background_rgb) != 3 or not all(0 <= c <= 255 for c in self.background_rgb):
            raise ParamsError(f"background_rgb: must be three values in 0..255, got {self.background_rgb!r}")


@dataclass(frozen=True, kw_only=True)
class PairsParams:
    """Positive pairs for MACL (stage ``pairs``)."""

    out_dir: str = "data/pairs"  # pairs.parquet, stats.json
    min_angle_deg: float = 30.0  # MVImgNet: viewing directions at least this far apart
    max_positives_per_frame: int = 2  # positives kept per reference frame (a seeded draw among the qualifying views)
    augmentations_per_box: int = 2  # OpenImages: augmentation recipes per box
    aug_scale_min: float = 0.7  # subject scale range of the augmentation recipes
    aug_scale_max: float = 1.3  # (min <= max)
    aug_flip_prob: float = 0.5  # chance of a horizontal flip
    aug_background_prob: float = 0.5  # chance of replacing the background with another photo
    seed: int = 0  # seeds every recipe

    def __post_init__(self) -> None:
        between(self, 0.0, 180.0, "min_angle_deg")
        at_least(self, 1, "max_positives_per_frame")
        at_least(self, 0, "augmentations_per_box")
        at_least(self, 1e-6, "aug_scale_min")
        not_above(self, "aug_scale_min", "aug_scale_max")
        between(self, 0.0, 1.0, "aug_flip_prob", "aug_background_prob")


@dataclass(frozen=True, kw_only=True)
class SimilarityParams:
    """Appearance-similarity top-k tables (stage ``similarity``)."""

    out_dir: str = "data/similarity"  # neighbours.parquet, hard_negatives.parquet
    k: int = 16  # neighbours kept per frame and per subject
    block_rows: int = 4096  # at most this many query rows per block (torch/triton: fewer if the memory budget says so)
    near_duplicate_r: float = 0.95  # different subjects at or above this r are near-duplicates
    # frame level: neighbours searched beyond k (up to the largest subject's frames - 1), so that an
    # object's own views do not fill the list; a list still cut at or above near_duplicate_r is
    # completed by a slower threshold search, so this trades speed only, never completeness
    near_duplicate_extra_k: int = 64
    hard_negatives: int = 8  # hard negatives listed per subject
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when present

    def __post_init__(self) -> None:
        at_least(self, 1, "k", "block_rows")
        at_least(self, 0, "near_duplicate_extra_k", "hard_negatives")
        between(self, -1.0, 1.0, "near_duplicate_r")


@dataclass(frozen=True, kw_only=True)
class ExportParams:
    """Training shards (stage ``export``)."""

    out_dir: str = "data/export"  # train/*.parquet, heldout/*.parquet, stats.json
    image_side: int = 512  # reference images are resized so the shorter side is this
    jpeg_quality: int = 95
    rows_per_shard: int = 1000
    workers: int = 2  # processes that decode, resize and encode images and masks (1: in the stage's process)
    heldout_fraction: float = 0.1  # share held out: of MVImgNet objects, of OpenImages photos (flows/splits.py)
    placeholder_token: str = "sks"  # the placeholder word in captions
    caption_template: str = "a photo of a {placeholder} {class_name}"
    seed: int = 0  # seeds the held-out split (flows/splits.py); pairs reads it too
    # Subjects the similarity stage flagged as near-duplicates share a split (with their photos or
    # objects, transitively), so no held-out subject has a near-copy in training (flows/splits.py).
    group_near_duplicates: bool = True

    def __post_init__(self) -> None:
        at_least(self, 16, "image_side")
        between(self, 1, 100, "jpeg_quality")
        at_least(self, 1, "rows_per_shard", "workers")
        between(self, 0.0, 1.0, "heldout_fraction", high_open=True)


def _check_scheduler_address(address: str) -> None:
    """A Dask address of a known protocol, with a port where the protocol needs one."""
    message = f"address: must be a scheduler address such as tcp://host:8786, or null; got {address!r}"
    if "://" not in address:
        raise ParamsError(message)
    from distributed.comm.addressing import parse_address, parse_host_port  # only when a cluster is named
    from distributed.comm.registry import get_backend

    try:
        scheme, location = parse_address(address, strict=True)
        get_backend(scheme)
        if scheme in ("tcp", "tls"):
            host, port = parse_host_port(location)
            if not host or not 0 < port < 65536:
                raise ValueError("needs a host and a port from 1 to 65535")
    except ValueError as exc:
        raise ParamsError(f"{message} ({exc})") from None


@dataclass(frozen=True, kw_only=True)
class ClusterParams:
    """Where ingest's shard probing, segment's SAM shards and export's image encoding run (flows/cluster.py).

    No DVC stage lists it: the outputs are the same bytes wherever the work runs (tested).
    """

    address: str | None = None  # a running Dask scheduler, e.g. tcp://host:8786; null: this machine's processes
    connect_timeout_s: float = 30.0  # how long to wait for the scheduler to answer

    def __post_init__(self) -> None:
        if self.address is not None:
            _check_scheduler_address(self.address)
        at_least(self, 1, "connect_timeout_s")


@dataclass(frozen=True, kw_only=True)
class ScheduleParams:
    """The scheduled Prefect deployment of the pipeline (``python -m flows.deploy``); no DVC stage reads it."""

    name: str = "nightly"  # the deployment is pipeline/<name>
    cron: str = "0 3 * * *"  # when it runs dvc repro (five-field cron)
    timezone: str = "UTC"  # IANA name the cron is read in
    targets: list[str] = field(default_factory=list)  # dvc repro targets (stage names); [] = every stage
    paused: bool = False  # register the schedule paused (runs only when started by hand)

    def __post_init__(self) -> None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ParamsError(f"timezone: unknown time zone {self.timezone!r}") from None
        if len(self.cron.split()) != 5:
            raise ParamsError(f"cron: must have five fields (minute hour day month weekday), got {self.cron!r}")


@dataclass(frozen=True, kw_only=True)
class Params:
    """The whole of params.yaml."""

    sample: SampleParams = field(default_factory=SampleParams)
    sources: SourcesParams = field(default_factory=SourcesParams)
    ingest: IngestParams = field(default_factory=IngestParams)
    filter: FilterParams = field(default_factory=FilterParams)
    segment: SegmentParams = field(default_factory=SegmentParams)
    embed: EmbedParams = field(default_factory=EmbedParams)
    pairs: PairsParams = field(default_factory=PairsParams)
    similarity: SimilarityParams = field(default_factory=SimilarityParams)
    export: ExportParams = field(default_factory=ExportParams)
    model: ModelParams = field(default_factory=ModelParams)  # cc_model: backbones, MFI encoder, ablations
    train: TrainParams = field(default_factory=TrainParams)  # cc_model: objective, loss weights, dropout
    sampling: SamplingParams = field(default_factory=SamplingParams)  # cc_model: generation (cc_model.inference)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)  # cc_model: DreamBench scores (stage evaluate)
    schedule: ScheduleParams = field(default_factory=ScheduleParams)  # the scheduled deployment (flows.deploy)
    cluster: ClusterParams = field(default_factory=ClusterParams)  # a Dask cluster for ingest, segment and export

    def __post_init__(self) -> None:
        if self.export.placeholder_token != self.model.placeholder_token:
            raise ParamsError(
                f"export.placeholder_token: {self.export.placeholder_token!r} differs from model.placeholder_token "
                f"{self.model.placeholder_token!r}; the shards' captions must hold the word the model replaces"
            )


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; raise :class:`ParamsError` naming the first bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise ParamsError(f"{where}: not valid YAML ({problem})") from None
    return from_mapping(Params, raw)
