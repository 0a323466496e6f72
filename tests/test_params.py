from pathlib import Path

import pytest

from pcam_pipeline.params import ParamsError, load_params, parse_params
from tests.conftest import REPO_ROOT, raw_params_with


def test_repository_params_load():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.fetch.source == "synthetic"
    assert params.validate_.fail_on_leakage is True
    assert params.as_dict()["validate"]["black_level"] == params.validate_.black_level


def test_unknown_key_names_key_and_allowed_keys():
    raw = raw_params_with({"train": {"learning_rate": 0.1}})
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    message = str(info.value)
    assert "train.learning_rate: unknown key 'learning_rate'" in message
    assert "lr" in message and "batch_size" in message


def test_bad_choice_names_allowed_values():
    raw = raw_params_with({"train": {"optimizer": "adam"}})
    with pytest.raises(ParamsError, match=r"train.optimizer: Input should be 'adamw' or 'sgd'"):
        parse_params(raw)


def test_bad_number_and_missing_key():
    raw = raw_params_with({"train": {"lr": -1}})
    del raw["evaluate"]["batch_size"]
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert "train.lr: Input should be greater than 0 (found -1)" in str(info.value)
    assert "evaluate.batch_size: required key is missing" in str(info.value)


def test_fetch_needs_a_checksums_file():
    raw = raw_params_with({"fetch": {"checksums": None}})
    with pytest.raises(ParamsError, match=r"fetch\.checksums: Input should be a valid string"):
        parse_params(raw)


def test_compression_needs_the_chunked_layout():
    raw = raw_params_with({"preprocess": {"layout": "contiguous", "compression": "lzf"}})
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    assert "preprocess: compression 'lzf' needs layout 'chunked'" in str(info.value)
    assert "set preprocess.layout: chunked" in str(info.value)
    parse_params(raw_params_with({"preprocess": {"layout": "chunked", "compression": "lzf"}}))


def test_unknown_section():
    with pytest.raises(ParamsError, match="unknown key 'trian'"):
        parse_params({**raw_params_with(), "trian": {}})


def test_file_errors(tmp_path: Path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_cli_reports_bad_params_with_exit_code_2(tmp_path: Path, capsys):
    from pcam_pipeline.cli import main

    bad = tmp_path / "params.yaml"
    bad.write_text(
        (REPO_ROOT / "params.yaml").read_text().replace("source: synthetic", "source: zenodoo")
    )
    assert main(["--params", str(bad), "fetch"]) == 2
    assert (
        "fetch.source: Input should be 'synthetic', 'zenodo' or 'path'" in capsys.readouterr().err
    )
