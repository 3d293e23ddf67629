"""Module boundaries, by plain import inspection: the apps stand on magnet_core, the contract is parsed once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
# Coordinator-side command-line tools (not the ServerApp): they may read the operator's environment (FLWR_HOME).
SERVER_CLI_TOOLS = {"deploy_cli.py", "pki_cli.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {n.split(".")[0] for n in names}


def _files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package,forbidden", [
    ("client", {"server", "simulations"}),
    ("server", {"client", "simulations"}),
    ("magnet_core", {"flwr", "client", "server", "simulations"}),
])
def test_packages_import_only_what_their_boundary_allows(package, forbidden):
    offenders = {str(p.relative_to(REPO)): sorted(_imports(p) & forbidden) for p in _files(package)}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_server_app_reads_no_run_settings_from_the_environment():
    environ = re.compile(r"os\.environ|os\.getenv|getenv\(")
    offenders = [str(p.relative_to(REPO)) for p in _files("server")
                 if p.name not in SERVER_CLI_TOOLS and environ.search(p.read_text())]
    assert not offenders


def test_only_the_contract_knows_the_wire_keys():
    keys = re.compile(r"""["'](?:cm|hist|count|withheld)-|["']num-examples["']|["']server-round["']""")
    offenders = [str(p.relative_to(REPO)) for package in ("client", "server", "simulations") for p in _files(package)
                 if keys.search(p.read_text())]
    assert not offenders


def test_flower_app_config_mirrors_the_run_config_defaults():
    """Flower needs every run-config key in pyproject.toml; the values there must be the project's defaults."""
    from server.config import FederatedConfig

    app_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == FederatedConfig().to_run_config()


def test_no_module_level_callbacks_or_env_overrides_remain():
    text = "\n".join(p.read_text() for package in ("client", "server", "simulations") for p in _files(package))
    assert "ROUND_CALLBACKS" not in text and "MAGNET_FL_RUN_CONFIG" not in text and "ENV_OVERRIDE" not in text
