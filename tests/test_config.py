"""Config files, dotted overrides, and the errors a user sees for bad keys and values."""

import pytest

from asyncrl.config import ConfigError, config_reference, load_config
from conftest import ROOT, run_cli


def test_quickstart_config_loads():
    cfg = load_config(ROOT / "configs/quickstart.yaml")
    assert cfg.run_name == "quickstart"
    assert cfg.task.name == "repeat"


def test_dotted_overrides_set_nested_and_top_level_keys():
    cfg = load_config(ROOT / "configs/quickstart.yaml", ["learner.lr=3e-4", "max_staleness=2", "sampling.stop_tokens=[5, 6]"])
    assert cfg.learner.lr == pytest.approx(3e-4)
    assert cfg.max_staleness == 2
    assert cfg.sampling.stop_tokens == [5, 6]


def test_unknown_key_is_named_in_the_error():
    with pytest.raises(ConfigError, match=r"learner\.lrr: unknown key \(value 0\.1\)"):
        load_config(None, ["learner.lrr=0.1"])


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"learner\.lr = 'fast'"):
        load_config(None, ["learner.lr=fast"])


def test_out_of_range_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"sampling\.top_p = 1\.5"):
        load_config(None, ["sampling.top_p=1.5"])


def test_unknown_key_in_yaml_file_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden: 64\n")
    with pytest.raises(ConfigError, match=r"model\.hidden: unknown key"):
        load_config(path)


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match=r"max_staleness = 1 is a value, not a section"):
        load_config(ROOT / "configs/quickstart.yaml", ["max_staleness.x=1"])


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        load_config(None, ["learner.lr"])


def test_sync_every_beyond_staleness_bound_is_rejected():
    with pytest.raises(ConfigError, match="learner.sync_every=3 with max_staleness=1"):
        load_config(None, ["learner.sync_every=3", "max_staleness=1"])


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="cannot read config file 'nope.yaml'"):
        load_config("nope.yaml")


def test_every_field_has_a_doc():
    reference = config_reference()
    assert "| `learner.lr` |" in reference
    for line in reference.splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"undocumented field: {line}"


def test_cli_reports_config_error_without_traceback():
    result = run_cli("learner", "--config", "configs/quickstart.yaml", "learner.lr=fast", timeout=60)
    assert result.returncode != 0
    assert "learner.lr = 'fast'" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_reference_in_docs_is_current():
    """docs/config.md is generated; regenerate it with `asyncrl config-doc > docs/config.md`."""
    assert (ROOT / "docs/config.md").read_text() == config_reference() + "\n"
