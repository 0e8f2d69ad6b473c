from pathlib import Path

import pytest

from flows.config.params import FilterParams, Params, load_params
from flows.config.typed import ParamsError, from_mapping, to_mapping

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_project_params_load():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.filter.mvimgnet_area.min == pytest.approx(0.01)


def test_project_params_spell_out_every_key():
    # DVC tracks the values written in params.yaml; a key left to its default in code is invisible
    # to it, so changing that default would not rerun the stages that read it.
    import yaml

    def omitted(full: dict, written: dict, prefix: str = "") -> list[str]:
        out = []
        for key, value in full.items():
            if key not in written:
                out.append(prefix + key)
            elif isinstance(value, dict) and isinstance(written[key], dict):
                out += omitted(value, written[key], f"{prefix}{key}.")
        return out

    written = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert omitted(to_mapping(load_params(ROOT / "params.yaml")), written) == []


def test_defaults_round_trip():
    params = Params()
    assert from_mapping(Params, to_mapping(params)) == params


def test_unknown_key_names_the_key(tmp_path):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, "filter:\n  min_blur: 3\n"))
    assert str(err.value).startswith("filter.min_blur: unknown key")
    assert "\n" not in str(err.value)


def test_unknown_section(tmp_path):
    with pytest.raises(ParamsError, match=r"^filtr: unknown key"):
        load_params(write(tmp_path, "filtr: {}\n"))


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ParamsError, match=r"^filter\.min_image_side: expected int, got str 'abc'"):
        load_params(write(tmp_path, "filter:\n  min_image_side: abc\n"))


def test_nested_and_list_types(tmp_path):
    with pytest.raises(ParamsError, match=r"^filter\.mvimgnet_area\.max: expected float"):
        load_params(write(tmp_path, "filter:\n  mvimgnet_area: {min: 0.1, max: [1]}\n"))
    with pytest.raises(ParamsError, match=r"^filter\.class_deny\[1\]: expected str"):
        load_params(write(tmp_path, "filter:\n  class_deny: [cat, 3]\n"))
    with pytest.raises(ParamsError, match=r"^sources\.enabled\[0\]: expected one of"):
        load_params(write(tmp_path, "sources:\n  enabled: [imagenet]\n"))


def test_bool_is_not_int_and_ints_are_floats(tmp_path):
    with pytest.raises(ParamsError, match=r"^ingest\.max_workers: expected int, got bool"):
        load_params(write(tmp_path, "ingest:\n  max_workers: true\n"))
    params = load_params(write(tmp_path, "filter:\n  min_blur_score: 12\n"))
    assert params.filter.min_blur_score == 12.0 and isinstance(params.filter.min_blur_score, float)


def test_missing_required_nested_key(tmp_path):
    with pytest.raises(ParamsError, match=r"^filter\.openimages_area\.max: missing required key"):
        load_params(write(tmp_path, "filter:\n  openimages_area: {min: 0.1}\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "filter: [\n"))


def test_configs_are_frozen():
    with pytest.raises(Exception):
        FilterParams().min_image_side = 3  # type: ignore[misc]


def test_placeholder_tokens_must_agree(tmp_path):
    with pytest.raises(ParamsError, match=r"^export\.placeholder_token: 'zwx' differs from model\.placeholder_token 'sks'"):
        load_params(write(tmp_path, "export:\n  placeholder_token: zwx\n"))


@pytest.mark.parametrize("text, message", [
    ("ingest:\n  frames_per_shard: 0\n", r"^ingest\.frames_per_shard: must be >= 1, got 0$"),
    ("similarity:\n  k: 0\n", r"^similarity\.k: must be >= 1, got 0$"),
    ("export:\n  heldout_fraction: 1.5\n", r"^export\.heldout_fraction: must be in \[0\.0, 1\.0\), got 1\.5$"),
    ("filter:\n  mvimgnet_area: {min: 0.64, max: 0.01}\n", r"^filter\.mvimgnet_area\.min: must be <= max \(0\.01\)"),
    ("pairs:\n  aug_flip_prob: 2\n", r"^pairs\.aug_flip_prob: must be in \[0\.0, 1\.0\]"),
    ("embed:\n  background_rgb: [1, 2]\n", r"^embed\.background_rgb: must be three values in 0\.\.255"),
    ("segment:\n  batch_images: 0\n", r"^segment\.batch_images: must be >= 1"),
    ("filter:\n  min_blur_score: .nan\n", r"^filter\.min_blur_score: must be >= 0, got nan"),
    ("filter:\n  box_aspect_min: 3.0\n", r"^filter\.box_aspect_min: must be <= box_aspect_max"),
])
def test_values_out_of_range_fail_in_one_line_naming_the_key(tmp_path, text, message):
    with pytest.raises(ParamsError, match=message):
        load_params(write(tmp_path, text))


def test_bad_yaml_names_the_line_and_column(tmp_path):
    with pytest.raises(ParamsError, match=r"params\.yaml:\d+:\d+: not valid YAML \(expected"):
        load_params(write(tmp_path, "filter:\n  min_image_side: 3\n  bad: [1, 2\n"))


def test_the_check_command_fails_on_a_key_no_stage_reads(tmp_path, capsys):
    from flows.config.__main__ import main

    assert main([str(write(tmp_path, "model:\n  gama: 1.0\n"))]) == 1
    assert capsys.readouterr().err.startswith("error: model.gama: unknown key")
    assert main([str(ROOT / "params.yaml")]) == 0
