import pytest

from posefr_dist.config import Config, ConfigError, DataConfig, dump_config, load_config


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  batch_size: 8\nmodel:\n  variant: jam\n")
    cfg = load_config(f, ["data.batch_size=16", "loss.lambda_je=1e-2", "eval.fars=[0.01, 0.001]"])
    assert cfg.data.batch_size == 16
    assert cfg.model.variant == "jam"
    assert cfg.loss.lambda_je == pytest.approx(0.01)
    assert cfg.eval.fars == [0.01, 0.001]


def test_roundtrip_dump_load(tmp_path):
    cfg = load_config(None, ["synth.identities=12", "data.on_bad_row=skip"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(f) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.on_bad_row=ignore", r"data.on_bad_row: got 'ignore'; allowed: 'error', 'skip'"),
        ("data.batch_sise=3", r"data.batch_sise: unknown key; did you mean batch_size"),
        ("data.batch_size=abc", r"data.batch_size: expected an integer"),
        ("data.batch_size=0", r"data.batch_size: must be > 0"),
        ("model.variant=3d-only", r"model.variant"),
        ("eval.yaw_edges=[10, 30]", r"eval.yaw_edges: must start at 0"),
        ("nosuchsection.x=1", r"nosuchsection: unknown key"),
        ("data.augment.hflip_prob=2", r"data.augment.hflip_prob"),
        ("train.ray_log_level=LOUD", r"train.ray_log_level: got 'LOUD'; allowed: 'DEBUG', 'INFO'"),
        ("justakey", r"expected key=value"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  on_bad_row: explode\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*data.on_bad_row"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_int_to_float_coercion_but_not_bool():
    cfg = load_config(None, ["loss.w_3d=2"])
    assert isinstance(cfg.loss.w_3d, float)
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(None, ["loss.w_3d=true"])


def test_sections_are_dataclasses():
    cfg = Config()
    assert isinstance(cfg.data, DataConfig)


def test_unquoted_off_in_yaml_is_the_string_off(tmp_path):
    """YAML 1.1 reads `cache: off` as false; a string key gets back the word the user wrote."""
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  cache: off\n")
    assert load_config(p).data.cache == "off"
    p.write_text("train:\n  precision: on\n")
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(p)
