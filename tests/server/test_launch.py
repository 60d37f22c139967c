"""`zk0 server` refuses to serve without certificates unless told --insecure, and writes a valid Flower app."""

import tomllib

from flwr.common.config import validate_config

from zk0.cli import main
from zk0.server.config import parse_server_config
from zk0.server.launch import write_app_dir


def test_server_without_certificates_is_one_clear_line(tmp_path, capsys):
    config = tmp_path / "server.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\ndeployment: {{certs_dir: {tmp_path / 'nocerts'}}}\n")
    assert main(["server", "--config", str(config)]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("zk0 server: no server certificate in") and "\n" not in out


def test_invalid_server_config_is_one_clear_line(tmp_path, capsys):
    config = tmp_path / "server.yaml"
    config.write_text("training: {rounds: -1}\n")
    assert main(["server", "--config", str(config)]) == 2
    assert "training.rounds: must be >= 1" in capsys.readouterr().out


def test_generated_app_dir_is_a_valid_flower_app(tmp_path):
    run_config = parse_server_config({"evaluation": {"datasets": ["/d/a", "/d/b"]}}).run_config(tmp_path / "s.yaml")
    app = write_app_dir(tmp_path / "app", run_config)
    pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(pyproject, check_module=True, project_dir=app)
    assert ok, errors
    assert pyproject["tool"]["flwr"]["app"]["components"]["serverapp"] == "zk0.server.server_app:app"
    assert pyproject["tool"]["flwr"]["app"]["config"]["eval-datasets"] == "/d/a,/d/b"
