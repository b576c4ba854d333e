"""Run config: loading, errors naming file/key/line, schema, CLI."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from peg.cli import app
from peg.config import ConfigError, RunConfig, json_schema, load_config

GOOD = """\
name: demo
model:
  name_or_path: sentence-transformers/all-MiniLM-L6-v2
loss:
  kind: infonce
  temperature: 0.02
  progressive:
    enabled: true
batch:
  queries_per_step: 64
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_good_config_fills_defaults(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.loss.temperature == 0.02
    assert config.loss.progressive.enabled is True
    assert config.batch.hard_negatives == 5
    assert config.mining.relative_margin == 0.95


def test_unknown_key_names_file_key_and_line(tmp_path):
    path = write(tmp_path, GOOD.replace("  temperature: 0.02", "  temprature: 0.02"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:6: loss.temprature: Extra inputs are not permitted" in str(err.value)


def test_wrong_type_names_nested_key_and_line(tmp_path):
    path = write(tmp_path, GOOD.replace("queries_per_step: 64", "queries_per_step: many"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}:10: batch.queries_per_step:" in str(err.value)


def test_wrong_value_and_missing_section(tmp_path):
    path = write(tmp_path, "name: Bad_Name\nloss:\n  kind: triplet\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:1: name:" in message
    assert f"{path}:3: loss.kind: Input should be 'infonce' or 'listwise'" in message
    assert f"{path}: model: Field required" in message


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "name: demo\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_section_hash_tracks_only_named_sections(tmp_path):
    a = load_config(write(tmp_path, GOOD))
    b = a.model_copy(deep=True)
    b.train.learning_rate = 1.0
    assert a.section_hash("model", "mining") == b.section_hash("model", "mining")
    assert a.section_hash("train") != b.section_hash("train")


def test_cli_show_and_schema(tmp_path):
    runner = CliRunner()
    shown = runner.invoke(app, ["config", "show", str(write(tmp_path, GOOD))])
    assert shown.exit_code == 0, shown.output
    assert "temperature: 0.02" in shown.output and "relative_margin: 0.95" in shown.output
    schema_path = tmp_path / "schema.json"
    assert runner.invoke(app, ["config", "schema", "-o", str(schema_path)]).exit_code == 0
    assert '"RunConfig"' in schema_path.read_text() or '"title": "RunConfig"' in schema_path.read_text()
    bad = runner.invoke(app, ["config", "show", str(write(tmp_path, GOOD + "bogus: 1\n"))])
    assert bad.exit_code == 2 and "bogus: Extra inputs are not permitted" in bad.output


def test_schema_forbids_unknown_keys():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert set(RunConfig.model_fields) <= set(schema["properties"])
